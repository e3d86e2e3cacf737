"""Evaluate prefixes: sentiment (default) or the paper's E2E table-to-text task (--task e2e).

Sentiment: for each held-out text: its first --prompt-words words are the prompt; the model continues it under the
text's own sentiment prefix (and, as a control, under the flipped one). The continuation is scored with our
BLEU and ROUGE against the rest of the text, and judged by VADER. Then an alpha sweep from neutral prompts.

  python eval.py --prefix weights/embedding.safetensors weights/kv.safetensors weights/kv-mlp.safetensors

E2E: every test table decoded as the paper decodes it (beam 5, at least 5 and at most 100 new tokens, newlines
banned) under the task prefix, or by a fine-tuned model folder (--model without --prefix), and scored with the
official e2e-metrics definitions of BLEU, NIST, ROUGE-L and CIDEr (minprefix/e2e_metrics.py).

  python eval.py --task e2e --prefix weights/e2e-prefix.safetensors --data ../shared/data/e2e/test.txt.gz
  python eval.py --task e2e --model weights/e2e-finetuned --limit 50
"""
import argparse
import json
import os
import sys
import time

import torch

from minprefix import GPT2, Tokenizer, fast
from minprefix.data import read_jsonl
from minprefix.prefix import DEFAULT_CHECKPOINT, load_prefix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

COLUMNS = [("BLEU", "bleu", "{:.2f}"), ("ROUGE-1", "rouge1", "{:.3f}"), ("ROUGE-2", "rouge2", "{:.3f}"),
           ("ROUGE-L", "rougeL", "{:.3f}"), ("sentiment acc. [95% CI]", "acc_intended", "pct"),
           ("flipped acc. [95% CI]", "acc_flipped", "pct"), ("VADER gap", "vader_gap", "{:+.3f}"),
           ("perplexity", "perplexity", "{:.1f}"),
           ("distinct-1", "distinct1", "{:.3f}"), ("distinct-2", "distinct2", "{:.3f}")]


def row_name(meta):
    if meta is None:
        return "base model, no prefix"
    if meta["mode"] == "embedding":
        return f"embedding prefix (soft prompt), P={meta['prefix_len']}"
    return f"K/V prefix{' + MLP' if json.loads(meta.get('trained_with_mlp', 'false')) else ''}, P={meta['prefix_len']}"


def markdown(rows, alphas):
    head = ["setup"] + [c for c, _, _ in COLUMNS] + [f"VADER mean, alpha={a:g}" for a in alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        cells = [name] + [cell(r, key, fmt) for _, key, fmt in COLUMNS]
        cells += [f"{r['alpha_sweep'][a]:+.3f}" if "alpha_sweep" in r else "" for a in alphas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(row, key, fmt):
    if key not in row:
        return "-"
    if fmt == "pct":  # an accuracy with its Wilson 95% interval
        lo, hi = row[key + "_ci"]
        return f"{row[key]:.0%} [{lo:.0%}, {hi:.0%}]"
    return fmt.format(row[key])


def plot_sweep(rows, alphas, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows:
        if "alpha_sweep" in r:
            ax.plot(alphas, [r["alpha_sweep"][a] for a in alphas], "o-", label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("alpha  (mixed = alpha * positive + (1 - alpha) * negative)")
    ax.set_ylabel("mean VADER compound of the generations")
    ax.set_title("the sentiment dial, from neutral prompts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment", choices=["sentiment", "e2e"], help="(default: %(default)s)")
    p.add_argument("--prefix", nargs="+", help="prefix checkpoints, one table row each (all for the same base "
                   f"model) (default: {DEFAULT_CHECKPOINT}; e2e: weights/e2e-prefix.safetensors, unless --model "
                   "names a fine-tuned model folder)")
    p.add_argument("--data", help="held-out data (default: data/test.jsonl; e2e: ../shared/data/e2e/test.txt.gz)")
    p.add_argument("--limit", type=int, help="e2e: the first N tables only (default: all 630 of the test set)")
    p.add_argument("--batch-size", type=int, default=10, help="e2e: tables decoded together (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=5, help="e2e (default: %(default)s, the paper's)")
    p.add_argument("--prompt-words", type=int, default=3, help="sentiment: words of each held-out text given as "
                   "the prompt (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=2, help="sentiment: continuations per held-out text "
                   "(default: %(default)s)")
    p.add_argument("--sweep-samples", type=int, default=8, help="sentiment: continuations per neutral prompt "
                   "and alpha (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, help="(default: sentiment 40; e2e 100, the paper's)")
    p.add_argument("--temperature", type=float, default=0.7, help="sentiment (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="sentiment (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", help="folder for the results (default: weights/eval; e2e: weights/eval-e2e)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoints say; e2e without "
                   "--prefix: the fine-tuned model folder to evaluate")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py off)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    for flag in ("limit", "batch_size", "num_beams", "prompt_words", "n_samples", "sweep_samples", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return e2e(p, args) if args.task == "e2e" else sentiment(p, args)


def load(args, prefix_paths):
    """The base model (accelerated unless --reference) and the prefixes, checked against it."""
    first_meta = load_prefix(prefix_paths[0])[1] if prefix_paths else None
    where = args.model or first_meta["base_model"]
    model = GPT2.from_pretrained(where, dtype=DTYPES[args.dtype], device=args.device)
    if fast.enabled():
        fast.accelerate(model)
    prefixes = [load_prefix(path, model) for path in prefix_paths]
    return model, [(pr.to(model.device), meta) for pr, meta in prefixes]


def e2e(p, args):
    from minprefix.e2e import evaluate_e2e, read_tables, write_results
    if args.prefix is None and args.model is None:
        args.prefix = ["weights/e2e-prefix.safetensors"]
    if args.prefix and len(args.prefix) > 1:
        p.error("--task e2e evaluates one system at a time: give one --prefix")
    data = args.data or "../shared/data/e2e/test.txt.gz"
    table_list = read_tables(data, args.limit)
    model, prefixes = load(args, args.prefix or [])
    prefix, meta = prefixes[0] if prefixes else (None, None)
    if meta is not None and (len(meta["labels"]) != 1 or not meta["info"].get("conditional")):
        p.error(f"{args.prefix[0]} is a prefix for labelled text ({', '.join(meta['labels'])}); --task e2e needs "
                f"one trained on table||text data (train.py --data ../shared/data/e2e/train.txt.gz)")
    system = (f"fine-tuned {model.name_or_path}" if prefix is None else
              f"{row_name(meta)} ({args.prefix[0]})")
    outputs, scores, settings = evaluate_e2e(
        model, Tokenizer(), table_list, prefix, system=system, batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens or 100)
    settings.update(data=data, limit=args.limit, dtype=args.dtype, path="reference" if not fast.enabled() else "fast")
    out = args.out or "weights/eval-e2e"
    write_results(out, table_list, outputs, scores, settings)
    print(open(os.path.join(out, "eval.md")).read())
    print(f"wrote {out}/e2e_outputs.txt, e2e_refs.txt, eval.json, eval.md")
    return 0


def sentiment(p, args):
    from minprefix.evaluation import Judge, evaluate_prefix, evaluate_reference
    t0 = time.time()
    args.prefix = args.prefix or [DEFAULT_CHECKPOINT]
    args.data = args.data or "data/test.jsonl"
    args.max_new_tokens = args.max_new_tokens or 40
    args.out = args.out or "weights/eval"
    model, prefixes = load(args, args.prefix)
    device = model.device
    labels = prefixes[0][1]["labels"]
    for path, (_, meta) in zip(args.prefix, prefixes):
        if meta["labels"] != labels:
            p.error(f"{path} has labels {meta['labels']}, {args.prefix[0]} has {labels}: they cannot share a table")
    if sorted(labels) != ["negative", "positive"]:
        p.error(f"{args.prefix[0]} has labels {', '.join(labels)}; the sentiment evaluation's judge (VADER) knows "
                f"only positive and negative (for a table-to-text prefix use --task e2e)")
    examples = read_jsonl(args.data, labels=labels)
    tok, judge = Tokenizer(), Judge()
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    settings = dict(n_words=args.prompt_words, n_samples=args.n_samples, sweep_samples=args.sweep_samples,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, alphas=alphas,
                    temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    rows = []
    for name, prefix in [(row_name(None), None)] + [(row_name(m), pr) for pr, m in prefixes]:
        t = time.time()
        rows.append((name, evaluate_prefix(model, tok, judge, examples, labels, prefix, **settings)))
        print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr)

    rows.append(("held-out texts themselves (how often VADER agrees with the human label)",
                 evaluate_reference(model, tok, judge, examples, n_words=args.prompt_words)))

    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows, alphas)
    minutes = (time.time() - t0) / 60
    note = (f"base model {model.name_or_path}; {len(examples)} held-out texts x {args.n_samples}, prompt = first "
            f"{args.prompt_words} words; sweep: {args.sweep_samples} samples x 10 neutral prompts per alpha; "
            f"temperature {args.temperature}, top-p {args.top_p}, {args.max_new_tokens} new tokens, seed {args.seed}; "
            f"{args.dtype}, {'reference' if not fast.enabled() else 'fast'} path; {minutes:.1f} min on {device}")
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"settings": dict(settings, alphas=list(alphas), base_model=model.name_or_path, data=args.data,
                                    prefixes=args.prefix), "rows": [dict(r, name=n) for n, r in rows],
                   "minutes": minutes}, f, indent=2, default=str)
    plot_sweep(rows, alphas, os.path.join(args.out, "alpha_sweep.png"))
    print(table)
    print(f"\n{note}\nwrote {args.out}/eval.md, eval.json, alpha_sweep.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
