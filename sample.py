"""Write with a trained prefix: pure (--sentiment) or mixed (--alpha: alpha*positive + (1-alpha)*negative).

  python sample.py --alpha 1.0                       # positive
  python sample.py --alpha 0.5 --prompt "The labs"   # halfway
  python sample.py --sentiment negative --n 5
"""
import argparse
import sys

import torch

from minprefix import GPT2, Tokenizer, generate
from minprefix.prefix import DEFAULT_CHECKPOINT, label_weights, load_prefix


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default=DEFAULT_CHECKPOINT, help="prefix checkpoint from train.py (default: %(default)s)")
    tone = p.add_mutually_exclusive_group()
    tone.add_argument("--alpha", type=float, help="weight of the first label (positive) against the second "
                      "(negative): 1.0 positive, 0.0 negative (default: 0.5 with two labels)")
    tone.add_argument("--sentiment", help="one label's pure prefix, e.g. positive")
    tone.add_argument("--weights", help="one weight per label, comma-separated, in the checkpoint's label order")
    p.add_argument("--extrapolate", action="store_true", help="allow --alpha outside [0, 1]")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a fresh review)")
    p.add_argument("--n", type=int, default=3, help="samples, drawn together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, 1 for off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoint says (a moved folder)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1:
        p.error("--n and --max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or (args.top_k is not None and args.top_k < 1):
        p.error("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 1")

    prefix, meta = load_prefix(args.prefix)
    labels = meta["labels"]
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
        else:
            weights = label_weights(len(labels), alpha=0.5 if args.alpha is None else args.alpha)
    except ValueError as e:
        p.error(str(e))

    model = GPT2.from_pretrained(args.model or meta["base_model"], device=args.device)
    device = model.wte.weight.device
    prefix, meta = load_prefix(args.prefix, model)  # again, now checked against the base model
    prefix.to(device)
    tok = Tokenizer()
    mix = ", ".join(f"{w:g}*{l}" for w, l in zip(weights[0].tolist(), labels))
    print(f"# {meta['mode']} prefix ({meta['prefix_len']} positions) on {model.name_or_path}: {mix}")
    idx = torch.tensor([[tok.eot] + tok.encode(args.prompt)], device=device).repeat(args.n, 1)
    cache = prefix.cache(model, weights.to(device).repeat(args.n, 1))  # the mixed prefix, once per sample
    outs = generate(model, idx, args.max_new_tokens, kv_cache=cache, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for i, new in enumerate(outs, 1):
        print(f"[{i}] {args.prompt}{tok.decode(new)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
