"""Write with a trained prefix: pure (--sentiment) or mixed (--alpha: alpha*positive + (1-alpha)*negative).

  python sample.py --alpha 1.0                       # positive
  python sample.py --alpha 0.5 --prompt "The labs"   # halfway; at a terminal the text appears as it is written
  python sample.py --sentiment negative --n 5        # each sample is printed as soon as it ends
  python sample.py --prompts-file prompts.txt --output out.jsonl --temperature 0   # many prompts, batched
  python sample.py --prefix weights/e2e-prefix.safetensors --num-beams 5 \\
      --prompt "name : The Eagle | Type : pub | area : riverside"        # a source -> text prefix: the prompt is the source

Prompts of different lengths are decoded together, padded on the left with an attention mask that hides the
padding and positions that skip it (minprefix/gpt2.py), so each prompt is continued as it would be alone.
"""
import argparse
import json
import os
import sys

import torch

from minprefix import GPT2, Tokenizer, fast
from minprefix.beam import beam_search
from minprefix.data import source_prompt
from minprefix.generate import pad_left, stream
from minprefix.prefix import DEFAULT_CHECKPOINT, label_weights, load_prefix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default=DEFAULT_CHECKPOINT, help="prefix checkpoint from train.py (default: %(default)s)")
    tone = p.add_mutually_exclusive_group()
    tone.add_argument("--alpha", type=float, help="weight of the first label (positive) against the second "
                      "(negative): 1.0 positive, 0.0 negative (default: 0.5 with two labels)")
    tone.add_argument("--sentiment", help="one label's pure prefix, e.g. positive")
    tone.add_argument("--weights", help="one weight per label, comma-separated, in the checkpoint's label order")
    p.add_argument("--extrapolate", action="store_true", help="allow --alpha outside [0, 1]")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: none, a fresh text)")
    src.add_argument("--prompts-file", help="one prompt per line ('-': standard input), decoded in batches, "
                     "printed in the file's order")
    p.add_argument("--output", help="also write JSON Lines {\"prompt\", \"alpha\" or \"weights\", \"text\"}, one per sample")
    p.add_argument("--n", type=int, help="samples per prompt (default: 3; 1 with --prompts-file or --num-beams)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together with --prompts-file "
                   "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1], 1 for off (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams instead of sampling "
                   "(as the paper decodes E2E: 5) (default: %(default)s)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are decoded (default: at a terminal, with --n 1 and one prompt)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoint says (a moved folder)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py off)")
    return p


def read_prompts(path):
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with f:
        prompts = [line.rstrip("\r\n") for line in f]
    while prompts and not prompts[-1].strip():
        prompts.pop()
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    if args.n is None:
        args.n = 1 if args.prompts_file or args.num_beams > 1 else 3
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--num-beams", args.num_beams)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")

    prefix, meta = load_prefix(args.prefix)
    labels, conditional = meta["labels"], bool(meta["info"].get("conditional"))
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0 and not args.extrapolate:
        p.error(f"--alpha must be in [0, 1] (1.0 = {labels[0]}, 0.0 = {labels[-1]}), got {args.alpha}; "
                f"add --extrapolate to go beyond")
    if args.sentiment is not None and args.sentiment not in labels:
        p.error(f"--sentiment {args.sentiment!r}: this prefix knows {', '.join(labels)}")
    try:
        if args.sentiment is not None:
            weights = label_weights(len(labels), label=labels.index(args.sentiment))
        elif args.weights is not None:
            weights = label_weights(len(labels), weights=[float(w) for w in args.weights.split(",")])
        elif len(labels) == 1:
            weights = label_weights(1, label=0)
        else:
            weights = label_weights(len(labels), alpha=0.5 if args.alpha is None else args.alpha)
    except ValueError as e:
        p.error(f"--weights: {e}")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    n = args.n
    if conditional and not all(q.strip() for q in prompts):
        p.error("this prefix writes text for a source (e.g. an E2E table): give it with --prompt or --prompts-file")

    model = GPT2.from_pretrained(args.model or meta["base_model"], dtype=DTYPES[args.dtype], device=args.device)
    if fast.enabled():
        fast.accelerate(model)
    device = model.device
    prefix, meta = load_prefix(args.prefix, model)  # again, now checked against the base model
    prefix.to(device)
    tok = Tokenizer()
    mix = ", ".join(f"{w:g}*{l}" for w, l in zip(weights[0].tolist(), labels))
    print(f"# {meta['mode']} prefix ({meta['prefix_len']} positions) on {model.name_or_path}: {mix}", flush=True)
    decode_stream = fast.stream if fast.enabled() else stream
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    tone = {"alpha": args.alpha if args.alpha is not None else 0.5} if len(labels) == 2 and args.sentiment is None \
        and args.weights is None else {"weights": dict(zip(labels, weights[0].tolist()))}

    rows = [(i, q) for i, q in enumerate(prompts) for _ in range(n)]  # (prompt index, prompt), n per prompt
    ids = [source_prompt(tok, q) if conditional else [tok.eot] + tok.encode(q) for _, q in rows]
    streaming = args.stream if args.stream is not None else (sys.stdout.isatty() and len(rows) == 1)
    texts = [None] * len(rows)
    for start in range(0, len(rows), args.batch_size):
        batch = list(range(start, min(start + args.batch_size, len(rows))))
        idx, real = pad_left([ids[r] for r in batch], device=device)
        cache = prefix.cache(model, weights.to(device).repeat(len(batch), 1))  # the mixed prefix, once per row
        if args.num_beams > 1:
            outs = beam_search(model, idx, args.num_beams, args.max_new_tokens, kv_cache=cache, real=real)
            for r, new in zip(batch, outs):
                texts[r] = tok.decode(new)
                show(r, rows, texts[r], conditional, not args.prompts_file)
            continue
        steps = decode_stream(model, idx, args.max_new_tokens, kv_cache=cache, real=real,
                              seed=args.seed + start, **kw)
        if streaming:  # one row: print each piece of text as soon as its characters are whole
            print(f"[1] {'' if conditional else prompts[0]}", end="", flush=True)
            piece, new = tok.stream_decoder(), []
            for x in steps:
                if x[0, 0].item() == tok.eot:
                    break
                new.append(x[0, 0].item())
                print(piece(new[-1]), end="", flush=True)
            print()
            texts[batch[0]] = tok.decode(new)
            continue
        # several rows: print each as soon as it has written <|endoftext|> (or run out of tokens)
        done, tokens = set(), [[] for _ in batch]
        for x in steps:
            for j, t in enumerate(x[:, 0].tolist()):
                if j in done:
                    continue
                if t == tok.eot:
                    done.add(j)
                    texts[batch[j]] = tok.decode(tokens[j])
                    show(batch[j], rows, texts[batch[j]], conditional, not args.prompts_file)
                else:
                    tokens[j].append(t)
        for j in range(len(batch)):
            if j not in done:
                texts[batch[j]] = tok.decode(tokens[j])
                show(batch[j], rows, texts[batch[j]], conditional, not args.prompts_file)
        if args.prompts_file:
            print(f"# {batch[-1] + 1} of {len(rows)} done", file=sys.stderr, flush=True)
    if args.prompts_file:  # in the file's order, once all are done
        for r, text in enumerate(texts):
            show(r, rows, text, conditional)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for (i, q), text in zip(rows, texts):
                f.write(json.dumps({"prompt": q, **tone, "text": text}, ensure_ascii=False) + "\n")
        print(f"# wrote {len(rows)} rows to {args.output}")
    return 0


def show(r, rows, text, conditional, now=True):  # sample r, as "[r] prompt + text"
    if now:
        print(f"[{r + 1}] {'' if conditional else rows[r][1]}{text}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
