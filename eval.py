"""Evaluate checkpoints (prefixes, LoRAs, fine-tuned models): sentiment (default) or the paper's E2E
table-to-text task (--task e2e).

Sentiment: for each held-out text: its first --prompt-words words are the prompt; the model continues it under the
text's own label (and, as a control, under the flipped one). The continuation is scored with our BLEU and ROUGE
against the rest of the text, and judged by VADER. Then the alpha sweep from neutral prompts: the mean VADER score
at alpha 0, 0.25, 0.5, 0.75, 1 with its 95% interval, the dial's slope, and whether it rises monotonically; and
its ends as controlled-generation papers report them: the share of continuations judged positive at alpha 1 and
negative at alpha 0 (VADER, and AFINN beside it), against the bare model's own share from the same prompts, and
their perplexity under the bare model against that of the bare model's own samples (the ratio: fluency's cost).
--guidance evaluates each checkpoint at each strength of guidance at the logits (minprefix/guidance.py).

  python eval.py --prefix weights/embedding.safetensors weights/kv.safetensors weights/kv-mlp.safetensors

E2E: every test table decoded as the paper decodes it (beam 5, at most 100 new tokens, newlines banned; and at
least 5 new tokens, where the paper's min_length=5 counted the prompt) under the task prefix, or by a fine-tuned
model folder (--model without --prefix), and scored with the official e2e-metrics definitions of BLEU, NIST,
ROUGE-L and CIDEr (minprefix/e2e_metrics.py).

  python eval.py --task e2e --prefix weights/e2e-prefix.safetensors --data ../shared/data/e2e/test.txt.gz
  python eval.py --task e2e --model weights/e2e-finetuned --limit 50
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from minprefix import Tokenizer, fast
from minprefix.data import read_jsonl
from minprefix.env import load_env
from minprefix.guidance import ANCHORS, DEFAULT_ANCHOR, DEFAULT_STRENGTH
from minprefix.method import describe, latest, load, read_meta
from minprefix.prefix import DEFAULT_CHECKPOINT


COLUMNS = [("BLEU", "bleu", "{:.2f}"), ("ROUGE-1", "rouge1", "{:.3f}"), ("ROUGE-2", "rouge2", "{:.3f}"),
           ("ROUGE-L", "rougeL", "{:.3f}"), ("sentiment acc. [95% CI]", "acc_intended", "pct"),
           ("flipped acc. [95% CI]", "acc_flipped", "pct"), ("VADER gap", "vader_gap", "{:+.3f}"),
           ("perplexity", "perplexity", "{:.1f}"),
           ("distinct-1", "distinct1", "{:.3f}"), ("distinct-2", "distinct2", "{:.3f}"),
           ("dial slope [95% CI]", "dial_slope", "slope")]


def row_name(meta, guidance=0.0):
    if meta is None:
        return "base model, no prefix"
    return describe(meta) + (f", guidance {guidance:g}" if guidance else "")


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
    if fmt == "slope":  # the dial: VADER per unit of alpha, and whether the sweep's means rise at every step
        lo, hi = row[key + "_ci"]
        return f"{row[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]{'' if row['dial_monotone'] else ', not monotone'}"
    return fmt.format(row[key])


NEUTRAL_COLUMNS = ["positive at alpha 1, VADER [95% CI]", "AFINN", "negative at alpha 0, VADER [95% CI]", "AFINN",
                   "beyond the bare model (points, + / -)", "perplexity (x the bare model's own)", "distinct-2",
                   "distinct-3"]


def neutral_table(rows):
    """The dial's ends from neutral prompts, as controlled-generation papers report them; the bare model's row is
    its own samples (its share positive, and negative, of the same continuations)."""
    head = ["setup"] + NEUTRAL_COLUMNS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bare = next((r["neutral"] for name, r in rows if name == row_name(None) and "neutral" in r), None)
    for name, r in rows:
        if "neutral" not in r:
            continue
        n = r["neutral"]
        share = lambda judge, end: f"{n[judge][end]:.0%}" + (
            f" [{n[judge][end + '_ci'][0]:.0%}, {n[judge][end + '_ci'][1]:.0%}]" if judge == "VADER" else "")
        beyond = "" if bare is None or n is bare else (
            f"{100 * (n['VADER']['positive'] - bare['VADER']['positive']):+.0f} / "
            f"{100 * (n['VADER']['negative'] - bare['VADER']['negative']):+.0f}")
        ratio = f"{n['perplexity']:.1f}" + (f" ({n['perplexity'] / bare['perplexity']:.2f}x)" if bare else "")
        cells = [name, share("VADER", "positive"), share("AFINN", "positive") if "AFINN" in n else "-",
                 share("VADER", "negative"), share("AFINN", "negative") if "AFINN" in n else "-", beyond, ratio,
                 f"{n['distinct2']:.3f}", f"{n['distinct3']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def intended_share(neutral, judge="VADER"):
    """The share of the dial's ends with the tone asked for: the mean of positive at alpha 1 and negative at 0."""
    return (neutral[judge]["positive"] + neutral[judge]["negative"]) / 2


def plot_frontier(rows, path):
    """Control against fluency's cost, one point per row: x the ends' perplexity over the bare model's own samples',
    y the share of the ends with the tone asked for (VADER)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bare = next((r["neutral"] for name, r in rows if name == row_name(None) and "neutral" in r), None)
    if bare is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in rows:
        if "neutral" in r:
            n = r["neutral"]
            ax.plot(n["perplexity"] / bare["perplexity"], intended_share(n), "o")
            ax.annotate(name, (n["perplexity"] / bare["perplexity"], intended_share(n)), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("perplexity under the bare model, x its own samples'")
    ax.set_ylabel("share with the tone asked for (VADER)")
    ax.set_title("control against fluency, from neutral prompts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(rows, alphas, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_sweep(ax, rows, alphas)
    ax.set_title("the sentiment dial, from neutral prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_sweep(ax, rows, alphas):
    """Each row's alpha sweep [(name, row)]: the mean VADER score per alpha with its 95% interval."""
    for name, r in rows:
        if "alpha_sweep" in r:
            means = [r["alpha_sweep"][a] for a in alphas]
            lo = [m - r["alpha_sweep_ci"][a][0] for m, a in zip(means, alphas)]
            hi = [r["alpha_sweep_ci"][a][1] - m for m, a in zip(means, alphas)]
            ax.errorbar(alphas, means, yerr=[lo, hi], fmt="o-", capsize=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("alpha  (mixed = alpha * positive + (1 - alpha) * negative)")
    ax.set_ylabel("mean VADER compound (95% interval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment", choices=["sentiment", "e2e"], help="(default: %(default)s)")
    p.add_argument("--prefix", "--checkpoint", dest="prefix", nargs="+", help="checkpoints from train.py (prefix or "
                   "LoRA .safetensors; for e2e also a fine-tuned model folder), one table row each, all for the same "
                   f"base model (default: the one train.py wrote last, else {DEFAULT_CHECKPOINT}; e2e: "
                   "weights/e2e-prefix.safetensors, unless --model names a model folder)")
    p.add_argument("--data", help="held-out data (default: data/test.jsonl; e2e: ../shared/data/e2e/test.txt.gz)")
    p.add_argument("--limit", type=int, help="the first N held-out texts (sentiment) or tables (e2e) only "
                   "(default: all; e2e: all 630 tables of the test set)")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="sentiment: include the base model's row, no prefix (default: on)")
    p.add_argument("--batch-size", type=int, default=10, help="e2e: tables decoded together (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=5, help="e2e (default: %(default)s, the paper's)")
    p.add_argument("--prompt-words", type=int, default=3, help="sentiment: words of each held-out text given as "
                   "the prompt (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=2, help="sentiment: continuations per held-out text; 0 for "
                   "the neutral prompts only (default: %(default)s)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="sentiment: the sweep's alphas, in [0, 1]; the ends' shares need 0 and 1 (default: %(default)s)")
    p.add_argument("--sweep-samples", type=int, default=24, help="sentiment: continuations per neutral prompt "
                   "and alpha (default: %(default)s: 240 per alpha with the 10 built-in prompts)")
    p.add_argument("--sweep-prompts", help="sentiment: a file of neutral prompts for the alpha sweep, one per line "
                   "(default: 10 built-in prompts about the summer school, e.g. 'The lectures')")
    p.add_argument("--max-new-tokens", type=int, help="(default: sentiment 40; e2e 100, the paper's)")
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_STRENGTH],
                   help="sentiment: strengths of guidance at the logits (minprefix/guidance.py), each checkpoint "
                        "evaluated at each; 0 is the K/V mix alone (default: %(default)s, sample.py's)")
    p.add_argument("--guide-from", default=DEFAULT_ANCHOR, choices=ANCHORS, help="sentiment: guidance's anchor: "
                   "the bare model (DExperts' form) or the K/V mix (default: %(default)s, sample.py's)")
    p.add_argument("--temperature", type=float, default=0.7, help="sentiment (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="sentiment (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", help="folder for the results (default: weights/eval; e2e: weights/eval-e2e)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoints say; e2e without "
                   "--prefix: a model folder to evaluate as it is (fine-tuned, or a base model)")
    p.add_argument("--dtype", default="float32", choices=list(fast.DTYPES), help=fast.DTYPE_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py off)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    for flag in ("limit", "batch_size", "num_beams", "prompt_words", "sweep_samples", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.n_samples < 0:
        p.error(f"--n-samples must be at least 0, got {args.n_samples}")
    if len(set(args.alphas)) < 2 or not all(0.0 <= a <= 1.0 for a in args.alphas):
        p.error(f"--alphas: two or more values in [0, 1], got {' '.join(map(str, args.alphas))}")
    if any(g < 0 for g in args.guidance):
        p.error(f"--guidance must be >= 0, got {' '.join(map(str, args.guidance))}")
    if fast.enabled():
        fast.keep_freed_memory()  # a process-wide malloc setting: the script's to choose, not the library's
    return e2e(p, args) if args.task == "e2e" else sentiment(p, args)


def load_all(p, args, paths):
    """The base model (accelerated unless --reference) and the checkpoints, each checked against it."""
    metas = [read_meta(path) for path in paths]
    bases = {m["base_model"] for m in metas}
    if len(bases) > 1 and not args.model:
        p.error(f"the checkpoints are for different base models ({', '.join(sorted(bases))}): evaluate them apart")
    model = fast.decoding_model(args.model or metas[0]["base_model"], args.dtype, args.device)
    return model, [load(path, model) for path in paths]


def e2e(p, args):
    from minprefix.e2e import evaluate_e2e, read_tables, write_results
    if args.prefix is None and args.model is None:
        args.prefix = ["weights/e2e-prefix.safetensors"]
    if args.prefix and len(args.prefix) > 1:
        p.error("--task e2e evaluates one system at a time: give one --prefix")
    if args.prefix and read_meta(args.prefix[0])["mode"] == "base":  # a model folder as it is: as --model FOLDER
        args.model, args.prefix = args.prefix[0], None
    data = args.data or "../shared/data/e2e/test.txt.gz"
    table_list = read_tables(data, args.limit)
    if args.prefix:
        model, [(method, meta)] = load_all(p, args, args.prefix)
        if not meta["info"].get("conditional"):
            p.error(f"{args.prefix[0]} was trained on labelled text ({', '.join(meta['labels'])}); --task e2e needs "
                    f"one trained on table||text data (train.py --data ../shared/data/e2e/train.txt.gz; a PEFT "
                    f"adapter trained on tables: python -m minprefix.peft import ... --conditional)")
        system = f"{describe(meta)} ({args.prefix[0]})"
    else:  # a model folder as it is: fine-tuned by train.py, or any model in the hub's layout
        model = fast.decoding_model(args.model, args.dtype, args.device)
        method = None
        config = json.loads(open(os.path.join(args.model, "config.json")).read()) if os.path.isdir(args.model) else {}
        tuned = config.get("minprefix", {})
        if tuned and not tuned.get("conditional"):
            p.error(f"{args.model} was fine-tuned on labelled text, not on table||text data: --task e2e needs a model "
                    f"fine-tuned on tables (train.py --data ../shared/data/e2e/train.txt.gz --mode finetune)")
        system = (f"fine-tuned from {tuned.get('fine_tuned_from')} ({args.model})" if tuned else
                  f"base model {model.name_or_path}, as it is (not fine-tuned by train.py)")
    outputs, scores, settings = evaluate_e2e(
        model, Tokenizer.for_model(model.name_or_path), table_list, method, system=system,
        batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens or 100)
    settings.update(data=data, limit=args.limit, dtype=args.dtype, path="reference" if not fast.enabled() else "fast")
    out = args.out or "weights/eval-e2e"
    write_results(out, table_list, outputs, scores, settings)
    print(open(os.path.join(out, "eval.md")).read())
    print(f"wrote {out}/e2e_outputs.txt, e2e_refs.txt, eval.json, eval.md")
    return 0


def sentiment(p, args):
    from minprefix.evaluation import (NEUTRAL_PROMPTS, AfinnJudge, Judge, evaluate_prefix, evaluate_reference,
                                      n_continuations)
    t0 = time.time()
    args.prefix = args.prefix or [latest(DEFAULT_CHECKPOINT)]
    args.data = args.data or "data/test.jsonl"
    args.max_new_tokens = args.max_new_tokens or 40
    args.out = args.out or "weights/eval"
    metas = [read_meta(path) for path in args.prefix]
    for path, meta in zip(args.prefix, metas):
        if meta["mode"] in ("finetune", "base"):
            what = ("a model used as it is" if meta["mode"] == "base" else
                    "a fine-tuned model: one model for every label")
            p.error(f"{path} is {what}, with nothing to steer by; the sentiment evaluation compares a method's "
                    f"labels (train a prefix or a LoRA; its table has the base model's row already)")
    labels = metas[0]["labels"]
    for path, meta in zip(args.prefix, metas):
        if meta["labels"] != labels:
            p.error(f"{path} has labels {meta['labels']}, {args.prefix[0]} has {labels}: they cannot share a table")
    if sorted(labels) != ["negative", "positive"]:
        p.error(f"{args.prefix[0]} has labels {', '.join(labels)}; the sentiment evaluation's judge (VADER) knows "
                f"only positive and negative (for a table-to-text prefix use --task e2e)")
    sweep_prompts = NEUTRAL_PROMPTS
    if args.sweep_prompts:
        sweep_prompts = [l.strip() for l in open(args.sweep_prompts, encoding="utf-8") if l.strip()]
        if not sweep_prompts:
            p.error(f"--sweep-prompts {args.sweep_prompts}: no prompts")
    model, methods = load_all(p, args, args.prefix)
    device = model.device
    examples = read_jsonl(args.data, labels=labels)[:args.limit]
    tok, judge, second = Tokenizer.for_model(model.name_or_path), Judge(), AfinnJudge()
    if any(g and not method.mixes for method, _ in methods for g in args.guidance):
        p.error("--guidance combines the labels' logits; a checkpoint here has no labels to mix")
    alphas = tuple(sorted(set(args.alphas)))
    settings = dict(n_words=args.prompt_words, n_samples=args.n_samples, sweep_samples=args.sweep_samples,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, alphas=alphas, sweep_prompts=sweep_prompts,
                    temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    names = [row_name(m) for _, m in methods]
    names = [f"{n} ({os.path.basename(str(path))})" if names.count(n) > 1 else n for n, path in zip(names, args.prefix)]
    systems = ([(row_name(None), None, 0.0)] if args.base else []) + [
        (n + (f", guidance {g:g}" + (" from the mix" if args.guide_from == "mix" else "") if g else ""), method, g)
        for n, (method, _) in zip(names, methods)
        for g in args.guidance]
    total = sum(n_continuations(method, len(examples), args.n_samples, args.sweep_samples, len(alphas),
                                len(sweep_prompts)) for _, method, _ in systems)
    rows = []
    with tqdm(total=total, desc="continuations", unit="text", dynamic_ncols=True) as bar:
        for name, method, g in systems:
            t = time.time()
            bar.set_postfix_str(name)
            rows.append((name, evaluate_prefix(model, tok, judge, examples, labels, method, progress=bar,
                                               second=second, guidance=g, anchor=args.guide_from, **settings)))
            tqdm.write(f"{name}: {time.time() - t:.0f} s")

    rows.append(("held-out texts themselves (how often VADER agrees with the human label)",
                 evaluate_reference(model, tok, judge, examples, n_words=args.prompt_words)))

    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows, alphas)
    minutes = (time.time() - t0) / 60
    note = (f"base model {model.name_or_path}; {len(examples)} held-out texts x {args.n_samples}, prompt = first "
            f"{args.prompt_words} words; sweep: {args.sweep_samples} samples x {len(sweep_prompts)} neutral prompts "
            f"per alpha; temperature {args.temperature}, top-p {args.top_p}, {args.max_new_tokens} new tokens, seed "
            f"{args.seed}; {args.dtype}, {'reference' if not fast.enabled() else 'fast'} path; {minutes:.1f} min on "
            f"{device}")
    for name, r in rows:
        if "dial_slope" in r:
            a0, a1 = alphas[0], alphas[-1]
            lo, hi = r["alpha_sweep_ci"][a0], r["alpha_sweep_ci"][a1]
            note += (f"\n- {name}: dial slope {r['dial_slope']:+.3f} VADER per unit of alpha, "
                     f"{'monotone' if r['dial_monotone'] else 'NOT monotone'}; alpha {a0:g} {r['alpha_sweep'][a0]:+.3f} "
                     f"[{lo[0]:+.3f}, {lo[1]:+.3f}], alpha {a1:g} {r['alpha_sweep'][a1]:+.3f} [{hi[0]:+.3f}, "
                     f"{hi[1]:+.3f}], {r['alpha_sweep'][a1] - r['alpha_sweep'][a0]:.2f} apart: the ends' 95% "
                     f"intervals {'are apart' if r['dial_ends_apart'] else 'OVERLAP'}")
    ends = neutral_table(rows)
    note += (f"\n\nFrom the {len(sweep_prompts)} neutral prompts ({args.sweep_samples} samples each): the dial's ends, "
             f"and the bare model's own samples\n\n{ends}")
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(clean({"settings": dict(settings, alphas=list(alphas), base_model=model.name_or_path,
                                          data=args.data, prefixes=args.prefix, limit=args.limit,
                                          guidance=args.guidance, guide_from=args.guide_from),
                         "rows": [dict(r, name=n) for n, r in rows], "minutes": minutes}), f, indent=2,
                  allow_nan=False)
    plot_sweep(rows, alphas, os.path.join(args.out, "alpha_sweep.png"))
    frontier = plot_frontier(rows, os.path.join(args.out, "frontier.png"))
    print(table)
    print(f"\n{note}\nwrote {args.out}/eval.md, eval.json, alpha_sweep.png" + (", frontier.png" if frontier else ""))
    return 0


def clean(x):
    """JSON that strict parsers read: NaN and infinities become null, tuples lists, keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


if __name__ == "__main__":
    try:
        load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
