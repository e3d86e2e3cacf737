"""The paper's low-data finding, measured here: E2E with 50, 100, 200 and 500 training examples, prefix-tuning
against fine-tuning and LoRA (Li & Liang 2021, section 6.3, figure 3).

The protocol, as the paper's code runs it (gpt2/train_e2e.py with its "lowdata" notes, run_language_modeling.py,
train_control.py's low_data_init 3):
  data          `size` pairs drawn from E2E's training set per subsample; a development set of 30% of that size
                for early stopping (ours: drawn from E2E's validation set; the paper's files are not public)
  prefix        length 6: the tokens of "table-to-text:", its MLP (width 512) first fitted to those words'
                keys and values (Adam, lr 1e-4, 500 steps), then trained: lr 5e-5, batch 10, 100 warm-up steps,
                linear decay, at most 200 / 200 / 200 / 400 steps for 50 / 100 / 200 / 500 examples
  fine-tuning   every weight, the same lr, batch and warm-up, at most 100 / 100 / 200 / 400 steps; its input
                starts with the same words ("table-to-text: {table} <|endoftext|> {text}")
  LoRA          r=4, alpha 32 on the query and value parts of c_attn (the LoRA paper's GPT-2 setup), its lr 2e-4
                (the LoRA paper's E2E rate; it has no low-data protocol), the words as fine-tuning, the prefix's
                steps
  all           the held-out loss on the development set every 50 steps and at the end; the best is kept (the
                paper's early stopping); decoded and scored as eval.py --task e2e on the first 200 test tables
Where we differ: 3 subsamples x 1 seed per size (the paper: 5 x 2); the offline model imdb-gpt2-19m, which is NOT
GPT-2 (the paper: GPT-2 medium); our beam search is HF 5.x's (see README).

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python experiments/low_data.py        # resumes: finished runs are skipped; writes runs/low-data/
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, REPO, REPORT_HELP, TASK_WORDS, fmt, plot_lines, run, subsample  # noqa: E402
from minprefix.env import load_env  # noqa: E402

SIZES = (50, 100, 200, 500)
STEPS = {"prefix": {50: 200, 100: 200, 200: 200, 500: 400}, "fine-tuning": {50: 100, 100: 100, 200: 200, 500: 400},
         "LoRA": {50: 200, 100: 200, 200: 200, 500: 400}}
COMMON = ["--batch-size", "10", "--warmup", "100", "--weight-decay", "0", "--eval-every", "50", "--keep", "best"]


def method_args(method, init=TASK_WORDS):
    if method == "prefix":
        return ["--mode", "kv", "--mlp", "--prefix-len", "6", "--init", init, "--lr", "5e-5"]
    if method == "fine-tuning":
        return ["--mode", "finetune", "--lr", "5e-5"]
    return ["--mode", "lora", "--lora-rank", "4", "--lora-alpha", "32", "--lora-targets", "q,v", "--lr", "2e-4"]


def run_args(method, size, sub, init=TASK_WORDS, write=True):
    """-> (train.py's arguments, the task words put before each table or None) for one run of the protocol; write
    False: the data's paths, not drawn where they are missing."""
    words = None if method == "prefix" else TASK_WORDS
    train_file, dev_file = subsample(os.path.join(DATA, f"low-{size}-{sub}"), size, seed=1000 * size + sub,
                                     words=words, write=write)
    return (["--data", train_file, "--val-data", dev_file, *COMMON, "--max-steps", str(STEPS[method][size]),
             "--seed", str(sub), *method_args(method, init)], words)


def one(out, method, size, sub, init=TASK_WORDS, name=None, report=False):
    """One run of the protocol -> its result (runs/<study>/<size>-<sub>-<name>/result.json); None if report and
    not finished (or finished with other settings). report: no data drawn, nothing trained."""
    args, words = run_args(method, size, sub, init, write=not report)
    return run(os.path.join(out, f"{size}-{sub}-{name or method}"), args, words=words, report=report)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "low-data"), help="(default: runs/low-data)")
    p.add_argument("--subsamples", type=int, default=3, help="per size (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="(default: 50 100 200 500)")
    p.add_argument("--methods", nargs="+", default=list(STEPS), choices=list(STEPS), help="(default: all three)")
    p.add_argument("--report", action="store_true", help=REPORT_HELP)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {m: {size: [] for size in args.sizes} for m in args.methods}
    todo = [(size, sub, m) for size in args.sizes for sub in range(args.subsamples) for m in args.methods]
    for i, (size, sub, method) in enumerate(todo, start=1):
        if not args.report:
            print(f"== low data: run {i} of {len(todo)}: {method}, {size} examples, subsample {sub}", flush=True)
        r = one(args.out, method, size, sub, report=args.report)
        if r is not None:
            results[method][size].append(r)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_lines(os.path.join(args.out, "low_data.png"), "E2E with few examples", "training examples", results,
               metrics=("bleu", "rouge_l", "blank"), log_x=True)
    lines = ["| training examples | " + " | ".join(f"{m} BLEU | {m} ROUGE-L | {m} blank %" for m in args.methods)
             + " |", "|---|" + "---|---|---|" * len(args.methods)]
    for size in args.sizes:
        cells = []
        for m in args.methods:
            cells += [fmt([r["scores"]["bleu"] for r in results[m][size]], expected=args.subsamples),
                      fmt([r["scores"]["rouge_l"] for r in results[m][size]], expected=args.subsamples),
                      fmt([100 * r["blank"] for r in results[m][size] if r.get("blank") is not None], 0,
                          expected=args.subsamples)]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    both = [s for s in args.sizes if {"prefix", "fine-tuning"} <= set(args.methods)
            and results["prefix"][s] and results["fine-tuning"][s]]
    gaps = [sum(r["scores"]["bleu"] for r in results["prefix"][s]) / len(results["prefix"][s])
            - sum(r["scores"]["bleu"] for r in results["fine-tuning"][s]) / len(results["fine-tuning"][s])
            for s in both]
    table = "\n".join(lines)
    if gaps:
        table += ("\n\nprefix-tuning minus fine-tuning, mean BLEU per size: "
                  + ", ".join(f"{s}: {g:+.1f}" for s, g in zip(both, gaps))
                  + f"; on average {sum(gaps) / len(gaps):+.1f} (the paper, GPT-2 medium: +2.9, narrowing with more data)")
    print(table)
    with open(os.path.join(args.out, "low_data.md"), "w") as f:
        f.write(table + f"\n\nmean ± standard deviation [min-max] over {args.subsamples} subsamples; scored on the "
                "first 200 E2E test tables; blank %: the share of outputs that are empty or only spaces (where it "
                "is high, BLEU and ROUGE-L measure that collapse, not the text); imdb-gpt2-19m, NOT GPT-2.\n")
    print(f"wrote {args.out}/results.json, low_data.md, low_data.png")


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
