"""Prefix-tuning: learn one prefix per label (sentiment), or one task prefix (E2E table-to-text), GPT-2 frozen.

  python train.py --prefix-len 10 --mlp            # sentiment prefixes on data/, official gpt2 (hub or its cache)
  python train.py --model ../shared/models/imdb-gpt2-19m --prefix-len 10 --mlp   # the offline stand-in
  python train.py --data ../shared/data/e2e/train.txt.gz             # E2E with the paper's recipe (below)
  python train.py --data ../shared/data/e2e/train.txt.gz --mode finetune   # the paper's fine-tuning baseline
  python train.py --resume                          # continue the run whose checkpoint is at --out

Defaults follow the data. Labelled text (JSONL {"text", "sentiment"}): the reference setup, batch 2, lr 5e-5,
10 epochs, prefix length 10. Source -> text (E2E's table||text files, or JSONL {"source", "text"}): the paper's
E2E recipe (Li & Liang 2021, appendix A; its code gpt2/train_e2e.py): prefix length 5, MLP of width 512,
lr 8e-5, batch 10, 5 epochs, linear decay to 0, no warm-up, no weight decay; fine-tuning: lr 5e-5, batch 10,
5 epochs. Any flag given overrides its default.
"""
import argparse
import os
import sys
import time

import torch

from minprefix import GPT2, Tokenizer, fast
from minprefix.data import encode, file_digest, label_names, read_data
from minprefix.prefix import DEFAULT_CHECKPOINT
from minprefix.trainer import build_prefix, loss_plot_path, state_path, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {  # (labelled text, source -> text); fine-tuning differs in lr only
    "prefix_len": (10, 5), "mlp": (False, True), "epochs": (10, 5), "batch_size": (2, 10),
    "out": (DEFAULT_CHECKPOINT, "weights/e2e-prefix.safetensors"),
}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder in the hub's layout "
                        "(default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--data", default="data/train.jsonl", help="training data: JSONL {\"text\", \"sentiment\"}, "
                   "JSONL {\"source\", \"text\"}, or E2E table||text lines (.txt or .txt.gz) (default: %(default)s)")
    p.add_argument("--val-data", help="held-out data of the same kind, for the loss after each epoch (default: "
                   "data/test.jsonl for labelled text; for E2E, valid.txt.gz beside --data)")
    p.add_argument("--limit", type=int, help="train on the first N examples only")
    p.add_argument("--val-limit", type=int, help="hold out the first N held-out examples only")
    p.add_argument("--mode", default="kv", choices=["kv", "embedding", "finetune"],
                   help="kv: keys and values in every layer (prefix-tuning); embedding: vectors before the token "
                        "embeddings (a soft prompt, the baseline); finetune: every GPT-2 weight, no prefix (the "
                        "paper's baseline; --out is then a model folder) (default: %(default)s)")
    p.add_argument("--prefix-len", type=int, help="prefix positions per label (default: 10; E2E 5)")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="train through the paper's MLP reparametrization, kv mode (default: off; E2E on)")
    p.add_argument("--epochs", type=int, help="(default: 10; E2E 5)")
    p.add_argument("--batch-size", type=int, help="(default: 2; E2E 10)")
    p.add_argument("--lr", type=float, help="peak learning rate, decayed linearly to 0 (default: 5e-5; E2E 8e-5, "
                   "E2E fine-tuning 5e-5)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch texts of similar length together, as HF Trainer's group_by_length: less padding, "
                        "the same held-out loss (bench/bench_vs_peft.py) (default: on)")
    p.add_argument("--out", help=f"checkpoint to write (default: {DEFAULT_CHECKPOINT}; E2E "
                   "weights/e2e-prefix.safetensors, fine-tuning weights/e2e-finetuned/); the loss plot and the "
                   "state --resume needs go beside it")
    p.add_argument("--keep", default="best", choices=["best", "last"],
                   help="which epoch the checkpoint holds: the lowest held-out loss, or the last (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run at --out after its last finished epoch; "
                   "refused if the data, the base model or a hyperparameter differs")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the frozen model's weights; the prefix and the optimizer stay float32 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py "
                   "off; the same as MINPREFIX_REFERENCE=1)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    train_set = read_data(args.data)
    conditional = train_set[0].source is not None
    if args.lr is None:
        args.lr = 8e-5 if conditional and args.mode != "finetune" else 5e-5
    if args.mode != "kv":
        if args.mlp:
            p.error(f"--mlp reparametrizes the K/V prefix; --mode {args.mode} has none")
        args.mlp = False
    if args.mode == "finetune":
        if args.out is None:
            args.out = "weights/e2e-finetuned" if conditional else "weights/finetuned"
        if args.dtype != "float32":
            p.error(f"--mode finetune trains every weight in place: use --dtype float32, not {args.dtype}")
    for name, (plain, e2e) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, e2e if conditional else plain)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--val-limit", args.val_limit)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.val_data is None:
        args.val_data = os.path.join(os.path.dirname(args.data), "valid.txt.gz") if conditional else "data/test.jsonl"

    labels = label_names(train_set)
    val_set = read_data(args.val_data, labels=None if conditional else labels)
    if (val_set[0].source is not None) != conditional:
        p.error(f"--val-data {args.val_data} is not the same kind of data as --data {args.data}")
    train_set, val_set = train_set[:args.limit], val_set[:args.val_limit]

    torch.manual_seed(args.seed)
    tok = Tokenizer()
    model = GPT2.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    device = model.device
    prefix = None
    if args.mode != "finetune":
        try:
            prefix = build_prefix(args.mode, model, labels, args.prefix_len, args.mlp, tok).to(device)
        except ValueError as e:
            p.error(str(e).replace("prefix_len", "--prefix-len"))
    room = model.config.n_positions - (0 if prefix is None else args.prefix_len)
    train_items, val_items = (encode(s, tok, labels, room) for s in (train_set, val_set))

    base = model.num_params()
    trainable = base if prefix is None else sum(q.numel() for q in prefix.parameters())
    saved = base if prefix is None else prefix.table().numel()
    print(f"base model {model.name_or_path}: {base:,} parameters, {args.dtype}, "
          f"{'all trained' if prefix is None else 'frozen'}; {'reference' if not fast.enabled() else 'fast'} path")
    task = "source -> text" if conditional else f"labels {', '.join(f'{l} -> {i}' for i, l in enumerate(labels))}"
    print(f"{task}; {len(train_items)} training and {len(val_items)} held-out examples")
    what = "fine-tuning" if prefix is None else f"prefix ({args.mode}{', MLP' if args.mlp else ''}, {args.prefix_len} positions)"
    print(f"{what}: {trainable:,} trainable parameters ({100 * trainable / base:.2f}% of the base), {saved:,} saved "
          f"({100 * saved / base:.3f}%); lr {args.lr:g}, batch {args.batch_size}, {args.epochs} epochs")
    if prefix is not None and saved >= 0.01 * base:
        print(f"warning: the saved prefix is {100 * saved / base:.2f}% of the base model, above prefix-tuning's 1% budget")

    run = {"data": os.path.abspath(args.data), "data_sha256": file_digest(args.data), "limit": args.limit,
           "val_data": os.path.abspath(args.val_data), "val_limit": args.val_limit,
           "base_model": model.name_or_path, "base_config": vars(model.config), "mode": args.mode,
           "prefix_len": None if prefix is None else args.prefix_len, "mlp": args.mlp, "dtype": args.dtype,
           "keep": args.keep}
    info = {"data": args.data, "epochs": args.epochs, "trainable_params": trainable, "task": task,
            "conditional": conditional, "dtype": args.dtype}
    t0 = time.time()
    try:
        history = train(model, prefix, train_items, val_items, labels, args.out, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, info=info,
                        keep=args.keep, resume=args.resume, group_by_length=args.group_by_length, run=run)
    except (FileNotFoundError, ValueError) as e:
        if str(e).startswith("--resume"):
            p.error(str(e))
        raise
    minutes = (time.time() - t0) / 60
    kept = history["kept_epoch"]
    print(f"{'interrupted after' if history['interrupted'] else 'trained in'} {minutes:.1f} min on {device}; "
          + (f"kept epoch {kept} (held-out loss {history['val_loss'][kept - 1]:.4f}, --keep {args.keep})"
             if kept else "no epoch finished"))
    print(f"saved {saved:,} {'model' if prefix is None else 'prefix'} parameters to {args.out} (loss plot: "
          f"{loss_plot_path(args.out)}; resume state: {state_path(args.out)})")
    return 130 if history["interrupted"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
