"""Evaluate prefixes on the held-out split against the base model with no prefix.

For each held-out text: its first --prompt-words words are the prompt; the model continues it under the
text's own sentiment prefix (and, as a control, under the flipped one). The continuation is scored with our
BLEU and ROUGE against the rest of the text, and judged by VADER. Then an alpha sweep from neutral prompts.

  python eval.py --prefix weights/embedding.safetensors weights/kv.safetensors weights/kv-mlp.safetensors
"""
import argparse
import json
import os
import sys
import time

import torch

from minprefix import GPT2, Tokenizer
from minprefix.data import read_jsonl
from minprefix.evaluation import Judge, evaluate_prefix, evaluate_reference
from minprefix.prefix import DEFAULT_CHECKPOINT, load_prefix

COLUMNS = [("BLEU", "bleu", "{:.2f}"), ("ROUGE-1", "rouge1", "{:.3f}"), ("ROUGE-2", "rouge2", "{:.3f}"),
           ("ROUGE-L", "rougeL", "{:.3f}"), ("sentiment acc.", "acc_intended", "{:.0%}"),
           ("flipped acc.", "acc_flipped", "{:.0%}"), ("VADER gap", "vader_gap", "{:+.3f}"),
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
        cells = [name] + [fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS]
        cells += [f"{r['alpha_sweep'][a]:+.3f}" if "alpha_sweep" in r else "" for a in alphas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", nargs="+", default=[DEFAULT_CHECKPOINT], help="prefix checkpoints, one table row each "
                   "(all for the same base model) (default: %(default)s)")
    p.add_argument("--data", default="data/test.jsonl", help="held-out JSONL (default: %(default)s)")
    p.add_argument("--prompt-words", type=int, default=3, help="words of each held-out text given as the prompt "
                   "(default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=2, help="continuations per held-out text (default: %(default)s)")
    p.add_argument("--sweep-samples", type=int, default=8, help="continuations per neutral prompt and alpha "
                   "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default="weights/eval", help="folder for eval.json, eval.md, alpha_sweep.png "
                   "(default: %(default)s)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoints say")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    if min(args.prompt_words, args.n_samples, args.sweep_samples, args.max_new_tokens) < 1:
        p.error("--prompt-words, --n-samples, --sweep-samples and --max-new-tokens must be at least 1")

    t0 = time.time()
    first_meta = load_prefix(args.prefix[0])[1]
    model = GPT2.from_pretrained(args.model or first_meta["base_model"], device=args.device)
    device = model.wte.weight.device
    prefixes = [load_prefix(path, model) for path in args.prefix]
    labels = prefixes[0][1]["labels"]
    for path, (_, meta) in zip(args.prefix, prefixes):
        if meta["labels"] != labels:
            p.error(f"{path} has labels {meta['labels']}, {args.prefix[0]} has {labels}: they cannot share a table")
    examples = read_jsonl(args.data, labels=labels)
    tok, judge = Tokenizer(), Judge()
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    settings = dict(n_words=args.prompt_words, n_samples=args.n_samples, sweep_samples=args.sweep_samples,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, alphas=alphas,
                    temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    rows = []
    for name, prefix in [(row_name(None), None)] + [(row_name(m), pr.to(device)) for pr, m in prefixes]:
        t = time.time()
        rows.append((name, evaluate_prefix(model, tok, judge, examples, labels, prefix, **settings)))
        print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr)

    rows.append(("held-out texts themselves (the judge's ceiling)",
                 evaluate_reference(model, tok, judge, examples, n_words=args.prompt_words)))

    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows, alphas)
    minutes = (time.time() - t0) / 60
    note = (f"base model {model.name_or_path}; {len(examples)} held-out texts x {args.n_samples}, prompt = first "
            f"{args.prompt_words} words; sweep: {args.sweep_samples} samples x 10 neutral prompts per alpha; "
            f"temperature {args.temperature}, top-p {args.top_p}, {args.max_new_tokens} new tokens, seed {args.seed}; "
            f"{minutes:.1f} min on {device}")
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
