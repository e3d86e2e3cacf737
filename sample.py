"""Write with a trained checkpoint (prefix, LoRA or fine-tuned model): one label (--sentiment) or a mix (--alpha:
alpha * positive + (1 - alpha) * negative; --weights: one weight per label).

  python sample.py --alpha 1.0                       # positive
  python sample.py --alpha 0.5 --prompt "The labs"   # halfway; at a terminal the text appears as it is written
  python sample.py --sentiment negative --n 5        # each sample is printed as soon as it ends
  python sample.py --prompts-file prompts.txt --output out.jsonl --temperature 0   # many prompts, batched
  python sample.py --prefix weights/e2e-prefix.safetensors --num-beams 5 \\
      --prompt "name : The Eagle | Type : pub | area : riverside"        # a source -> text prefix: the prompt is the source

The checkpoint is the one train.py wrote last (weights/latest), unless --prefix names another. Prompts of
different lengths are decoded together, padded on the left with an attention mask that hides the padding and
positions that skip it (minprefix/gpt2.py), so each prompt is continued as it would be alone. --stream decodes
one sample at a time (each printed as it is written); otherwise up to --batch-size rows at once.
"""
import argparse
import json
import os
import sys

import torch

from minprefix import Tokenizer, fast
from minprefix.data import source_prompt
from minprefix.e2e import DECODING
from minprefix.env import load_env
from minprefix.beam import hypotheses
from minprefix.generate import pad_left, stream
from minprefix.method import latest, load, read_meta
from minprefix.prefix import DEFAULT_CHECKPOINT, label_weights

SAMPLING = {"temperature": 0.8, "top_p": 0.9, "top_k": None, "seed": 0}  # defaults when sampling, not with beams


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", "--checkpoint", dest="prefix", help="a checkpoint from train.py: a prefix or LoRA "
                   f"(.safetensors) or a fine-tuned model folder (default: the one train.py wrote last, else "
                   f"{DEFAULT_CHECKPOINT})")
    tone = p.add_mutually_exclusive_group()
    tone.add_argument("--alpha", type=float, help="weight of the first label (positive) against the second "
                      "(negative): 1.0 positive, 0.0 negative (default: 0.5 with two labels)")
    tone.add_argument("--sentiment", help="one label alone, e.g. positive")
    tone.add_argument("--weights", help="one weight per label, comma-separated, in the checkpoint's label order")
    p.add_argument("--extrapolate", action="store_true", help="allow --alpha outside [0, 1]")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: none, a fresh text)")
    src.add_argument("--prompts-file", help="one prompt per line ('-': standard input; blank lines are skipped, and "
                     "said so), decoded in batches, printed in the file's order")
    p.add_argument("--output", help="also write JSON Lines, one per sample: {\"index\", \"prompt_index\", \"sample\", "
                   "\"prompt\", \"alpha\" or \"weights\", \"text\"} (and \"line\" with --prompts-file)")
    p.add_argument("--n", type=int, help="samples per prompt (default: 3; 1 with --prompts-file or --num-beams; "
                   "with --num-beams, the n best hypotheses)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, help="(default: 60; 100 for a source -> text checkpoint with beams)")
    p.add_argument("--temperature", type=float, help="0 for greedy (default: 0.8; not with --num-beams)")
    p.add_argument("--top-k", type=int, help="keep the k likeliest tokens (default: off; not with --num-beams)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1], 1 for off (default: 0.9; not with "
                   "--num-beams)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams instead of sampling "
                   "(as the paper decodes E2E: 5) (default: %(default)s)")
    p.add_argument("--min-new-tokens", type=int, help="beam search: hold <|endoftext|> back for this many tokens "
                   "(default: 0; 5 for a source -> text checkpoint, as eval.py --task e2e)")
    p.add_argument("--allow-newlines", action="store_true", help="beam search with a source -> text checkpoint: "
                   "do not ban the newline tokens 198 and 628 (the paper bans them)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are decoded, one sample at a time (default: at a terminal, with one "
                        "sample in all)")
    p.add_argument("--seed", type=int, help="(default: 0; not with --num-beams)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoint says (a moved folder)")
    p.add_argument("--dtype", default="float32", choices=list(fast.DTYPES), help=fast.DTYPE_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py off)")
    return p


def read_prompts(path):
    """-> [(line number, prompt)], blank lines skipped (and named on stderr)."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with f:
        lines = [line.rstrip("\r\n") for line in f]
    prompts = [(n, q) for n, q in enumerate(lines, start=1) if q.strip()]
    blank = [n for n, q in enumerate(lines, start=1) if not q.strip() and prompts and n < prompts[-1][0]]
    if blank:  # (blank lines at the end are no news)
        print(f"# {path}: skipped blank line{'s' if len(blank) > 1 else ''} {', '.join(map(str, blank))} (to write "
              f"a fresh text, use --prompt '')", file=sys.stderr)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def tone(p, args, meta, mixes):
    """-> (mixing weights (1, n_labels), what to record of them in --output)."""
    labels = meta["labels"]
    given = [f for f, v in (("--alpha", args.alpha), ("--sentiment", args.sentiment), ("--weights", args.weights))
             if v is not None]
    if not mixes:
        if given:
            p.error(f"{given[0]}: {args.prefix} is a fine-tuned model, one model for every label: it has no labels "
                    f"to mix (train a prefix or a LoRA for that)")
        return torch.ones(1, 1), {}
    if args.alpha is not None:
        if len(labels) != 2:
            p.error(f"--alpha mixes two labels; {args.prefix} has {len(labels)} ({', '.join(labels)}): "
                    + ("it has nothing to mix" if len(labels) == 1 else "give one weight per label with --weights"))
        if not 0.0 <= args.alpha <= 1.0 and not args.extrapolate:
            p.error(f"--alpha must be in [0, 1] (1.0 = {labels[0]}, 0.0 = {labels[1]}), got {args.alpha}; "
                    f"add --extrapolate to go beyond")
        return label_weights(2, alpha=args.alpha), {"alpha": args.alpha}
    if args.sentiment is not None:
        if args.sentiment not in labels:
            p.error(f"--sentiment {args.sentiment!r}: this checkpoint knows {', '.join(labels)}")
        w = label_weights(len(labels), label=labels.index(args.sentiment))
        return w, {"weights": dict(zip(labels, w[0].tolist()))}
    if args.weights is not None:
        try:
            values = [float(w) for w in args.weights.split(",")]
            w = label_weights(len(labels), weights=values)
        except ValueError as e:
            p.error(f"--weights {args.weights!r}: {e}; give {len(labels)} numbers, one per label "
                    f"({', '.join(labels)})")
        return w, {"weights": dict(zip(labels, w[0].tolist()))}
    if len(labels) == 1:
        return label_weights(1, label=0), {}
    if len(labels) == 2:
        return label_weights(2, alpha=0.5), {"alpha": 0.5}
    p.error(f"{args.prefix} has {len(labels)} labels ({', '.join(labels)}): choose one with --sentiment, or a mix "
            f"with --weights (one weight per label)")


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    beams = args.num_beams > 1
    if beams:  # beam search is deterministic and picks its own tokens: refuse what it would silently ignore
        for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                            ("--seed", args.seed), ("--stream", args.stream or None)):
            if value is not None:
                p.error(f"{flag} does not apply to beam search (--num-beams {args.num_beams}), which is deterministic; "
                        f"drop {flag}, or sample with --num-beams 1")
    else:
        for flag in ("min_new_tokens", "allow_newlines"):
            if getattr(args, flag) not in (None, False):
                p.error(f"--{flag.replace('_', '-')} is for beam search: give --num-beams too")
        for name, default in SAMPLING.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.n is None:
        args.n = 1 if args.prompts_file or beams else 3
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--num-beams", args.num_beams)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if beams and args.n > args.num_beams:
        p.error(f"--n {args.n}: beam search keeps {args.num_beams} hypotheses per prompt; ask for at most that many")
    if not beams:
        if args.temperature < 0:
            p.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
        if not 0 < args.top_p <= 1:
            p.error(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.top_k is not None and args.top_k < 1:
            p.error(f"--top-k must be at least 1, got {args.top_k}")

    args.prefix = args.prefix or latest(DEFAULT_CHECKPOINT)
    meta = read_meta(args.prefix)
    conditional = bool(meta["info"].get("conditional"))
    model = fast.decoding_model(args.model or meta["base_model"], args.dtype, args.device)
    method, meta = load(args.prefix, model)  # now checked against the base model
    weights, recorded = tone(p, args, meta, method.mixes)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [(None, args.prompt)]
    if conditional and not all(q.strip() for _, q in prompts):
        p.error("this checkpoint writes text for a source (e.g. an E2E table): give it with --prompt or --prompts-file")
    e2e = conditional and beams  # decode as eval.py --task e2e does, unless told otherwise
    if args.max_new_tokens is None:
        args.max_new_tokens = DECODING["max_new_tokens"] if e2e else 60
    device = model.device
    tok = Tokenizer()
    mix = ", ".join(f"{w:g}*{l}" for w, l in zip(weights[0].tolist(), meta["labels"])) if method.mixes else "no mix"
    print(f"# {meta['mode']} {args.prefix} on {model.name_or_path}: {mix}", flush=True)

    n, one = args.n, beams  # with beams, each prompt is decoded once and gives its n best hypotheses
    rows = [(i, q) for i, (_, q) in enumerate(prompts) for _ in range(1 if one else n)]
    ids = [source_prompt(tok, q) if conditional else [tok.eot] + tok.encode(q) for _, q in rows]
    streaming = args.stream if args.stream is not None else (sys.stdout.isatty() and len(rows) == 1 and not beams)
    texts = [[] for _ in rows]  # per row: its samples (n hypotheses with beams, else one)
    batch_size = 1 if streaming else args.batch_size
    in_order = args.prompts_file and not streaming  # printed at the end, in the file's order
    label = lambda r, j: r * n + j + 1 if one else r + 1  # the sample's number, as printed: [k]
    for start in range(0, len(rows), batch_size):
        batch = list(range(start, min(start + batch_size, len(rows))))
        idx, real = pad_left([ids[r] for r in batch], device=device)
        run, cache = method.apply(model, weights.to(device).repeat(len(batch), 1))  # one mix for every row
        if beams:
            settings = dict(min_new_tokens=args.min_new_tokens if args.min_new_tokens is not None else
                            (DECODING["min_new_tokens"] if e2e else 0),
                            banned=DECODING["banned"] if e2e and not args.allow_newlines else ())
            pieces = dict(steps=fast.StaticSteps, pairs=fast.best_pairs) if fast.enabled() else {}
            found = hypotheses(run, idx, args.num_beams, args.max_new_tokens, kv_cache=cache, real=real, **settings,
                               **pieces)
            for r, hyps in zip(batch, found):
                for j, (_, new) in enumerate(hyps[:n]):
                    texts[r].append(tok.decode(new[:-1] if new[-1:] == [tok.eot] else new))
                    show(label(r, j), rows[r][1], texts[r][-1], conditional, not in_order)
            continue
        steps = (fast.stream if fast.enabled() else stream)(run, idx, args.max_new_tokens, kv_cache=cache, real=real, seed=args.seed + start,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if streaming:  # one row: print each piece of text as soon as its characters are whole
            r = batch[0]
            print(f"[{r + 1}] {'' if conditional else rows[r][1]}", end="", flush=True)
            piece, new = tok.stream_decoder(), []
            for x in steps:
                if x[0, 0].item() == tok.eot:
                    break
                new.append(x[0, 0].item())
                print(piece(new[-1]), end="", flush=True)
            print()
            texts[r].append(tok.decode(new))
            continue
        # several rows: print each as soon as it has written <|endoftext|> (or run out of tokens), with its number
        done, tokens = set(), [[] for _ in batch]
        for x in steps:
            for j, t in enumerate(x[:, 0].tolist()):
                if j in done:
                    continue
                if t == tok.eot:
                    done.add(j)
                else:
                    tokens[j].append(t)
                    continue
                texts[batch[j]].append(tok.decode(tokens[j]))
                show(batch[j] + 1, rows[batch[j]][1], texts[batch[j]][0], conditional, not in_order)
        for j in range(len(batch)):
            if j not in done:
                texts[batch[j]].append(tok.decode(tokens[j]))
                show(batch[j] + 1, rows[batch[j]][1], texts[batch[j]][0], conditional, not in_order)
        if args.prompts_file:
            print(f"# {batch[-1] + 1} of {len(rows)} done", file=sys.stderr, flush=True)
    samples = [(r, j, text) for r in range(len(rows)) for j, text in enumerate(texts[r])]
    if in_order:  # in the file's order, once all are done
        for r, j, text in samples:
            show(label(r, j), rows[r][1], text, conditional)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for k, (r, j, text) in enumerate(samples):
                i = rows[r][0]
                row = {"index": k, "prompt_index": i, "sample": j if one else r % n,
                       **({"line": prompts[i][0]} if args.prompts_file else {}), "prompt": rows[r][1], **recorded,
                       "text": text}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"# wrote {len(samples)} samples to {args.output}")
    return 0


def show(number, prompt, text, conditional, now=True):  # one sample, as "[number] prompt + text"
    if now:
        print(f"[{number}] {'' if conditional else prompt}{text}", flush=True)


if __name__ == "__main__":
    try:
        load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
