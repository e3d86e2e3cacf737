"""Adapt a frozen GPT-2: one prefix (or LoRA) per label (sentiment), or one for a task (E2E table-to-text).

  python train.py --prefix-len 10 --mlp            # sentiment prefixes on data/, official gpt2 (hub or its cache)
  python train.py --model ../shared/models/imdb-gpt2-19m --prefix-len 10 --mlp   # the offline stand-in
  python train.py --mode lora                       # LoRA per label instead of a prefix (r=4 on q and v)
  python train.py --data ../shared/data/e2e/train.txt.gz             # E2E with the paper's recipe (below)
  python train.py --data ../shared/data/e2e/train.txt.gz --mode finetune   # the paper's fine-tuning baseline
  python train.py --resume                          # continue the run whose checkpoint is at --out
  python train.py --overwrite                       # start afresh where a run is: it is moved to *.previous.*

Defaults follow the data and the method (any flag given overrides its default):
  labelled text (JSONL {"text", "sentiment"}): 10 epochs, batch 2, prefix length 10; lr 5e-3 for a K/V prefix
    without the MLP or a soft prompt, 3e-4 with the MLP, 1e-3 for LoRA, 5e-5 for fine-tuning. These steer within
    the default run (README, "Results"); --recipe reference is the brief's reference setup instead: batch 2,
    lr 5e-5, for every method.
  source -> text (E2E's table||text files, or JSONL {"source", "text"}): the paper's E2E recipe (Li & Liang 2021,
    appendix A; its gpt2/train_e2e.py): prefix length 5, MLP of width 512, lr 8e-5, batch 10, 5 epochs, linear
    decay to 0, no warm-up, no weight decay; fine-tuning lr 5e-5; LoRA the LoRA paper's (Hu et al. 2021,
    table 11): lr 2e-4, batch 8, 500 warm-up steps, weight decay 0.01.
"""
import argparse
import os
import sys
import time

import torch

from minprefix import GPT2, Tokenizer, fast
from minprefix.data import FORMATS, encode, file_digest, label_names, read_data
from minprefix.env import load_env
from minprefix.lora import DEFAULT_TARGETS, check_targets
from minprefix.method import MODES, build, remember
from minprefix.trainer import (NothingToResume, aside_path, loss_plot_path, move_aside, plan, read_history,
                               run_files, state_path, train)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (labelled text, source -> text) per setting; lr per mode
DEFAULTS = {"prefix_len": (10, 5), "epochs": (10, 5), "batch_size": (2, 10)}
LR = {"labelled": {"kv": 5e-3, "kv+mlp": 3e-4, "embedding": 5e-3, "lora": 1e-3, "finetune": 5e-5},
      "reference": {"kv": 5e-5, "kv+mlp": 5e-5, "embedding": 5e-5, "lora": 5e-5, "finetune": 5e-5},
      "source": {"kv": 8e-5, "kv+mlp": 8e-5, "embedding": 8e-5, "lora": 2e-4, "finetune": 5e-5}}
# the contrastive term's weight on labelled text, by --mode: what the frontier showed best under sample.py's default
# guidance (docs/results.md, "Steering that wins"): it sharpens a prefix, and leaves LoRA less diverse and no better
# steered; the soft prompt follows the prefixes (not measured)
CONTRASTIVE = {"kv": 1.0, "embedding": 1.0, "lora": 0.0, "finetune": 0.0}
OUT = {"kv": "prefix.safetensors", "embedding": "prefix.safetensors", "lora": "lora.safetensors",
       "finetune": "finetuned"}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), hub repository (owner/name) or a local "
                        "folder in the hub's layout; its tokenizer comes with it (docs/models.md) (default: "
                        "$MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--data", default="data/train.jsonl", help="training data: JSONL {\"text\", \"sentiment\"}, "
                   "JSONL {\"source\", \"text\"}, or E2E table||text lines (.txt or .txt.gz) (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, help="what a JSONL file holds, where its rows do not say it "
                   "unambiguously: labelled (text, sentiment) or source (source, text) (default: read off the rows)")
    p.add_argument("--val-data", help="held-out data of the same kind, for the held-out pass after each epoch "
                   "(default: data/test.jsonl for labelled text; for E2E, valid.txt.gz beside --data)")
    p.add_argument("--limit", type=int, help="train on the first N examples only")
    p.add_argument("--val-limit", type=int, help="hold out the first N held-out examples only")
    p.add_argument("--mode", default="kv", choices=MODES,
                   help="kv: keys and values in every layer (prefix-tuning); embedding: vectors before the token "
                        "embeddings (a soft prompt, the baseline); lora: a low-rank change of chosen weights "
                        "(Hu et al. 2021); finetune: every GPT-2 weight, no prefix (the paper's baseline; --out is "
                        "then a model folder) (default: %(default)s)")
    p.add_argument("--prefix-len", type=int, help="prefix positions per label (default: 10; E2E 5)")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="train through the paper's MLP reparametrization, kv mode (default: off; E2E on)")
    p.add_argument("--init", help="where a prefix starts: 'random', or words whose activations it starts from, "
                   "e.g. ' table-to-text:' (default: each label's name without the MLP, random with it)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA's r (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA's alpha: the change is scaled by alpha / r "
                   "(default: %(default)s)")
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated: q, k, v (parts of attn.c_attn), c_attn (all of it, one pair), attn.c_proj, "
                        "mlp.c_fc, mlp.c_proj (default: %(default)s, the LoRA paper's GPT-2 setup)")
    p.add_argument("--contrastive", type=float, help="weight of the contrastive term: each text asked to be likelier "
                   "under its own label's prefix (or LoRA) than under the others' (Qian et al. 2022); costs about one "
                   "more forward and backward per extra label (default, for labelled text with two or more labels: %s; "
                   "0 otherwise)" % ", ".join(f"{w:g} with --mode {m}" for m, w in CONTRASTIVE.items() if w))
    p.add_argument("--recipe", choices=["steer", "reference"],
                   help="labelled text's defaults: steer (learning rates that turn the dial within the run) or "
                        "reference (the brief's setup: batch 2, lr 5e-5); source -> text data has the paper's E2E "
                        "recipe instead (default: steer)")
    p.add_argument("--epochs", type=int, help="(default: 10; E2E 5)")
    p.add_argument("--batch-size", type=int, help="(default: 2; E2E 10, E2E LoRA 8)")
    p.add_argument("--lr", type=float, help="peak learning rate, decayed linearly to 0 (default: by method, above)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: 0; E2E LoRA 500)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps, the schedule decaying to 0 there "
                   "(default: --epochs decide)")
    p.add_argument("--eval-every", type=int, help="the held-out pass every N steps instead of after each epoch, "
                   "--keep best choosing among them (the paper's low-data early stopping: 50)")
    p.add_argument("--weight-decay", type=float, help="AdamW's (default: 0; E2E LoRA 0.01)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch texts of similar length together, as HF Trainer's group_by_length: less padding, "
                        "the same held-out loss (bench/bench_vs_peft.py) (default: on)")
    p.add_argument("--out", help="checkpoint to write (default: weights/prefix.safetensors, weights/lora.safetensors "
                   "or weights/finetuned/; E2E weights/e2e-prefix.safetensors, ...); the loss plot and, while the "
                   "run lasts, the state --resume needs go beside it")
    p.add_argument("--keep", default="best", choices=["best", "loss", "last"],
                   help="which held-out pass the checkpoint holds: best (two or more labels: the one whose labels "
                        "steer best, the highest steering margin; one label: the lowest held-out loss), loss (the "
                        "lowest held-out loss whatever the labels) or the last (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run at --out after its last finished epoch "
                   "(a larger --epochs extends it); refused if the data, the base model or a hyperparameter differs")
    p.add_argument("--overwrite", action="store_true", help="start a new run where --out already holds one: its "
                   "checkpoint, history, loss plot and resume state are first moved to <name>.previous.* (without "
                   "this flag, or --resume, such a run is refused)")
    p.add_argument("--keep-resume-state", action="store_true", help="keep the resume state after the last epoch, so "
                   "that --resume --epochs N can extend the run later (default: removed once the run has finished)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the frozen model's weights; what is trained and the optimizer stay float32 (default: "
                        "%(default)s)")
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
    if args.resume and args.overwrite:
        p.error("--resume continues the run at --out, --overwrite starts a new one there: give one of them")
    train_set = read_data(args.data, format=args.format)
    conditional = train_set[0].source is not None
    if conditional and args.recipe == "reference":
        p.error(f"--recipe reference is labelled text's reference setup (batch 2, lr 5e-5); --data {args.data} is "
                f"source -> text, trained with the paper's E2E recipe: drop --recipe, or set --lr and --batch-size")
    if args.mode != "kv":
        if args.mlp:
            p.error(f"--mlp reparametrizes the K/V prefix; --mode {args.mode} has none")
        args.mlp = False
    if args.mlp is None:
        args.mlp = conditional
    if args.mode == "lora":
        try:
            targets = check_targets(t.strip() for t in args.lora_targets.split(","))
        except ValueError as e:
            p.error(f"--lora-targets: {e}")
    else:
        targets = None
    if args.contrastive is not None and args.contrastive < 0:
        p.error(f"--contrastive must be >= 0, got {args.contrastive}")
    if args.mode == "finetune" and args.dtype != "float32":
        p.error(f"--mode finetune trains every weight in place: use --dtype float32, not {args.dtype}")
    recipe = "source" if conditional else ("reference" if args.recipe == "reference" else "labelled")
    lora_e2e = conditional and args.mode == "lora"
    if lora_e2e and args.batch_size is None:
        args.batch_size = 8  # the LoRA paper's E2E batch
    for name, (plain, e2e) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, e2e if conditional else plain)
    if args.lr is None:
        args.lr = LR[recipe]["kv+mlp" if args.mode == "kv" and args.mlp else args.mode]
    args.warmup = args.warmup if args.warmup is not None else (500 if lora_e2e else 0)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (0.01 if lora_e2e else 0.0)
    if args.out is None:
        args.out = os.path.join("weights", ("e2e-" if conditional else "") + OUT[args.mode])
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--val-limit", args.val_limit), ("--lora-rank", args.lora_rank),
                        ("--max-steps", args.max_steps), ("--eval-every", args.eval_every)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.warmup < 0 or args.weight_decay < 0:
        p.error("--warmup and --weight-decay must be >= 0")
    if args.val_data is None:
        args.val_data = os.path.join(os.path.dirname(args.data), "valid.txt.gz") if conditional else "data/test.jsonl"
    there = run_files(args.out)
    if there and not args.resume and not args.overwrite:  # said before anything is loaded, and nothing is touched
        history = read_history(args.out)
        what = ("a finished run" if history and history.get("finished") else "an unfinished run" if history
                else "a run's files")
        p.error(f"--out {args.out} holds {what} ({', '.join(there)}): a new run would replace it. --resume "
                f"continues that run; --overwrite starts a new one, moving those files to "
                f"{aside_path(args.out)} first; or give another --out")

    labels = label_names(train_set)
    steers = not conditional and len(labels) > 1 and args.mode != "finetune"
    if args.contrastive is None:
        args.contrastive = CONTRASTIVE[args.mode] if steers else 0.0
    elif args.contrastive and not steers:
        p.error(f"--contrastive {args.contrastive:g}: the contrastive term tells labels apart; "
                + ("fine-tuning trains one model for every label" if args.mode == "finetune" else
                   f"{args.data} has one label ({labels[0]})") + ": drop --contrastive")
    val_set = read_data(args.val_data, labels=None if conditional else labels, format=args.format)
    if (val_set[0].source is not None) != conditional:
        p.error(f"--val-data {args.val_data} is not the same kind of data as --data {args.data}")
    train_set, val_set = train_set[:args.limit], val_set[:args.val_limit]

    torch.manual_seed(args.seed)
    model = GPT2.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    tok = Tokenizer.for_model(model.name_or_path)  # the model folder's own BPE, else GPT-2's
    device = model.device
    note = fast.half_precision_note(args.dtype, device)
    if note:
        print(note, file=sys.stderr)
    P = args.prefix_len if args.mode in ("kv", "embedding") else 0
    room = model.config.n_positions - P
    try:
        method = build(args.mode, model, labels, tok, args.prefix_len, args.mlp, args.lora_rank, args.lora_alpha,
                       targets, init=args.init)
    except ValueError as e:
        p.error(str(e).replace("prefix_len", "--prefix-len").replace("LoRA rank", "--lora-rank"))
    if P and not conditional and room < 3:
        p.error(f"--prefix-len {P} leaves {room} of the model's {model.config.n_positions} positions: a text needs "
                f"at least 3 (<|endoftext|>, a word, <|endoftext|>)")
    train_items, val_items = (encode(s, tok, labels, room) for s in (train_set, val_set))
    steps_per_epoch, args.epochs, total = plan(len(train_items), args.batch_size, args.epochs, args.max_steps)
    if args.warmup and args.warmup >= total:
        print(f"warning: --warmup {args.warmup} does not end within the run's {total} steps: the learning rate "
              f"rises to {(total - 1) / args.warmup:.0%} of --lr {args.lr:g} at the last step, never reaching it, "
              f"and never decays", file=sys.stderr)

    base = model.num_params()
    trainable = sum(q.numel() for q in method.parameters())
    print(f"base model {model.name_or_path}: {base:,} parameters, {args.dtype}, "
          f"{'all trained' if args.mode == 'finetune' else 'frozen'}; {'fast' if fast.enabled() else 'reference'} path")
    print(f"tokenizer: {tok.source}; end of text: token {tok.eot}")
    task = "source -> text" if conditional else f"labels {', '.join(f'{l} -> {i}' for i, l in enumerate(labels))}"
    print(f"{task}; {len(train_items)} training and {len(val_items)} held-out examples")
    what = {"finetune": "fine-tuning", "lora": f"LoRA (r={args.lora_rank}, alpha={args.lora_alpha:g}, on "
            f"{', '.join(targets or ())})"}.get(args.mode, f"prefix ({args.mode}{', MLP' if args.mlp else ''}, "
                                                           f"{args.prefix_len} positions)")
    print(f"{what}: {trainable:,} trainable parameters ({100 * trainable / base:.2f}% of the base); lr {args.lr:g}, "
          f"batch {args.batch_size}, {args.epochs} epochs ({total} steps)"
          + (f", warm-up {args.warmup}" if args.warmup else "")
          + (f", weight decay {args.weight_decay:g}" if args.weight_decay else "")
          + (f", contrastive term x{args.contrastive:g}" if args.contrastive else ""))

    run = {"data": os.path.abspath(args.data), "data_sha256": file_digest(args.data), "limit": args.limit,
           "val_data": os.path.abspath(args.val_data), "val_limit": args.val_limit, "format": args.format,
           "base_model": model.name_or_path, "base_config": vars(model.config), "mode": args.mode,
           "prefix_len": P or None, "mlp": args.mlp, "init": args.init, "dtype": args.dtype, "keep": args.keep,
           "lora": [args.lora_rank, args.lora_alpha, list(targets)] if targets else None}
    info = {"data": args.data, "epochs": args.epochs, "max_steps": args.max_steps, "trainable_params": trainable,
            "task": task,
            "conditional": conditional, "dtype": args.dtype, "init": args.init, "recipe": recipe,
            "contrastive": args.contrastive}
    if args.overwrite and there:
        print(f"moved the previous run's files aside: {', '.join(move_aside(args.out))}")
    if fast.enabled():
        fast.keep_freed_memory()  # a process-wide malloc setting: the script's to choose, not the library's
    t0 = time.time()
    try:
        history = train(model, method, train_items, val_items, labels, args.out, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, info=info,
                        keep=args.keep, resume=args.resume, group_by_length=args.group_by_length, run=run,
                        weight_decay=args.weight_decay, warmup=args.warmup, keep_state=args.keep_resume_state,
                        max_steps=args.max_steps, eval_every=args.eval_every, contrastive=args.contrastive)
    except NothingToResume as e:
        print(str(e).removeprefix("--resume: "))
        return 0
    except (FileNotFoundError, ValueError) as e:
        if str(e).startswith("--resume"):
            p.error(str(e))
        raise
    minutes = (time.time() - t0) / 60
    kept = history["kept_epoch"]
    if kept or history["interrupted"]:  # a checkpoint was written: sample.py and eval.py default to it
        remember(args.out)
    val = next(v for v in history["val"] if v["step"] == history["kept_step"]) if kept else {}
    print(f"{'interrupted after' if history['interrupted'] else 'trained in'} {minutes:.1f} min on {device}; "
          + (f"kept epoch {kept}" + (f", step {val['step']}" if args.eval_every else "")
             + f" (held-out loss {val['loss']:.4f}"
             + (f", steering margin {val['steer_margin']:+.4f}" if "steer_margin" in val else "")
             + f"; --keep {args.keep}: {history['selected_by']})" if kept else "no epoch finished"))
    saved = base if args.mode == "finetune" else method.table().numel() if args.mode == "kv" else \
        sum(q.numel() for q in method.state_dict().values())
    where = f"loss plot: {loss_plot_path(args.out)}" + (
        f"; resume state: {state_path(args.out)}" if os.path.exists(state_path(args.out)) else "")
    if history["interrupted"] and kept:
        print(f"{args.out} holds epoch {kept}, as written when it finished ({where})")
    else:
        print(f"saved {saved:,} parameters ({100 * saved / base:.3f}% of the base) to {args.out} ({where})")
    return 130 if history["interrupted"] else 0


if __name__ == "__main__":
    try:
        load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
