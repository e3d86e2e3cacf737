"""Prefix-tuning for sentiment: learn one prefix per label with GPT-2 frozen.

  python train.py --prefix-len 10 --mlp            # official gpt2 (needs the hub, or its cache)
  python train.py --model ../shared/models/imdb-gpt2-19m --prefix-len 10 --mlp   # the offline stand-in
"""
import argparse
import os
import sys
import time

import torch

from minprefix import GPT2, Tokenizer
from minprefix.data import encode, label_names, read_jsonl
from minprefix.prefix import DEFAULT_CHECKPOINT
from minprefix.trainer import build_prefix, loss_plot_path, train

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder in the hub's layout "
                        "(default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--data", default="data/train.jsonl", help="JSONL of {\"text\", \"sentiment\"} (default: %(default)s)")
    p.add_argument("--val-data", default="data/test.jsonl", help="held-out JSONL for the per-epoch loss (default: %(default)s)")
    p.add_argument("--mode", default="kv", choices=["kv", "embedding"],
                   help="kv: keys and values in every layer (prefix-tuning); embedding: vectors before the "
                        "token embeddings (a soft prompt, the baseline) (default: %(default)s)")
    p.add_argument("--prefix-len", type=int, default=10, help="prefix positions per label (default: %(default)s)")
    p.add_argument("--mlp", action="store_true", help="train through the paper's MLP reparametrization (kv mode)")
    p.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, decayed linearly to 0 (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_CHECKPOINT, help="prefix checkpoint to write (default: %(default)s); "
                                                      "the loss curve goes beside it as .loss.png")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = p.parse_args(argv)
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")

    torch.manual_seed(args.seed)
    tok = Tokenizer()
    model = GPT2.from_pretrained(args.model, device=args.device)
    device = model.wte.weight.device
    train_set = read_jsonl(args.data)
    labels = label_names(train_set)
    val_set = read_jsonl(args.val_data, labels=labels)
    try:
        prefix = build_prefix(args.mode, model, labels, args.prefix_len, args.mlp, tok).to(device)
    except ValueError as e:
        p.error(str(e).replace("prefix_len", "--prefix-len"))
    room = model.config.n_positions - args.prefix_len
    train_items, val_items = (encode(s, tok, labels, room) for s in (train_set, val_set))

    base = model.num_params()
    trainable = sum(q.numel() for q in prefix.parameters())
    saved = prefix.table().numel()
    print(f"base model {args.model}: {base:,} parameters, frozen")
    print(f"labels: {', '.join(f'{l} -> {i}' for i, l in enumerate(labels))}; "
          f"{len(train_items)} training and {len(val_items)} held-out texts")
    print(f"prefix ({args.mode}{', MLP' if args.mlp else ''}, {args.prefix_len} positions): {trainable:,} trainable "
          f"parameters ({100 * trainable / base:.2f}% of the base), {saved:,} saved ({100 * saved / base:.3f}%)")
    if saved >= 0.01 * base:
        print(f"warning: the saved prefix is {100 * saved / base:.2f}% of the base model, above prefix-tuning's 1% budget")

    t0 = time.time()
    info = {"data": args.data, "epochs": args.epochs, "trainable_params": trainable}
    history = train(model, prefix, train_items, val_items, labels, args.out, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, info=info)
    minutes = (time.time() - t0) / 60
    print(f"{'interrupted after' if history['interrupted'] else 'trained in'} {minutes:.1f} min on {device}; "
          f"final held-out loss {history['val_loss'][-1] if history['val_loss'] else float('nan'):.4f}")
    print(f"saved {saved:,} prefix parameters to {args.out} (loss curve: {loss_plot_path(args.out)})")
    return 130 if history["interrupted"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
