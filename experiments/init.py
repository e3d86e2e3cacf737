"""The paper's initialization finding, measured here: with 100 E2E examples, a prefix started from random values
against one started from real words, unrelated or about the task (Li & Liang 2021, section 7.4, figure 5: random
is low and varies; real words do much better; task words slightly better than unrelated ones).

The low-data protocol of experiments/low_data.py (100 examples, its 3 subsamples, length 6, MLP, lr 5e-5, 200
steps, early stopping every 50 steps, the first 200 test tables), the prefix started from
  random      the MLP as drawn (no fitting)
  unrelated   the MLP fitted to the keys and values of "elephant, orange, banana" (6 tokens, real words)
  task        the MLP fitted to those of "table-to-text:" (6 tokens): low_data.py's own prefix runs, reused

  python experiments/init.py            # resumes; writes runs/init/ (and reuses runs/low-data/)
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, REPORT_HELP, TASK_WORDS, fmt, spread  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from low_data import one  # noqa: E402

INITS = {"random": "random", "unrelated words": "elephant, orange, banana", "task words": TASK_WORDS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "init"), help="(default: runs/init)")
    p.add_argument("--low-data", default=os.path.join(REPO, "runs", "low-data"),
                   help="where low_data.py's runs are, for the task-words prefix (default: runs/low-data)")
    p.add_argument("--subsamples", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--report", action="store_true", help=REPORT_HELP)
    args = p.parse_args()
    results = {}
    for name, words in INITS.items():
        results[name] = []
        for sub in range(args.subsamples):
            if not args.report:
                print(f"== initialization: {name}, subsample {sub}", flush=True)
            if words == TASK_WORDS:  # the same run as low_data.py's
                r = one(args.low_data, "prefix", 100, sub, report=args.report)
            else:
                r = one(args.out, "prefix", 100, sub, init=words, name=name.replace(" ", "-"), report=args.report)
            if r is not None:
                results[name].append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "init.png"))
    lines = ["| initialization (100 examples) | BLEU | ROUGE-L | held-out loss at the kept step |", "|---|---|---|---|"]
    for name, rs in results.items():
        n = args.subsamples
        lines.append(f"| {name} ({INITS[name]!r}) | {fmt([r['scores']['bleu'] for r in rs], expected=n)} | "
                     f"{fmt([r['scores']['rouge_l'] for r in rs], expected=n)} | "
                     f"{fmt([r['val_loss'] for r in rs], 3, expected=n)} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "init.md"), "w") as f:
        f.write(table + f"\n\nmean ± standard deviation [min-max] over {args.subsamples} subsamples; imdb-gpt2-19m, "
                "NOT GPT-2.\n")
    print(f"wrote {args.out}/results.json, init.md, init.png")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("bleu", "rouge_l"), ("BLEU", "ROUGE-L")):
        names = list(results)
        for i, name in enumerate(names):
            values = [r["scores"][metric] for r in results[name]]
            if not values:
                continue
            mean, sd, _, _ = spread(values)
            ax.bar(i, mean, yerr=sd, capsize=4, color=["tab:gray", "tab:orange", "tab:blue"][i % 3], alpha=0.8)
            ax.plot([i] * len(values), values, "k.", ms=6)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"{label} (200 E2E test tables)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("prefix initialization, 100 examples (imdb-gpt2-19m, NOT GPT-2; bar: mean, whisker: sd, "
                 "dots: subsamples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
