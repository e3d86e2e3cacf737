"""At a larger budget that fits this machine, two of the paper's findings: the learning rate each method needs
(the paper's 8e-5 was chosen for 21,035 steps, not 500), and the prefix length (Li & Liang 2021, figure 4:
scores rise up to about 10 positions for table-to-text, then fall slightly; table 5: the embedding-only prefix
falls well below the full one).

The budget: the first 5,000 E2E training pairs, one epoch (500 steps of batch 10), the held-out loss on the first
500 validation pairs every 100 steps (the best kept), the first 200 test tables scored. Then:
  --study lr        per method, three or four learning rates, each run's held-out loss curve: prefix-tuning (length 5,
                    MLP) 8e-5 / 3e-4 / 1e-3 / 3e-3, LoRA (r=4 on q, v) 2e-4 / 1e-3 / 3e-3 / 1e-2, fine-tuning 5e-5 / 2e-4 / 5e-4
  --study length    P = 1, 5, 10, 20 for the K/V prefix with its MLP (at the best rate the lr study found), the
                    K/V table without it and the embedding-only prefix (both at 5e-3, the sentiment recipe's)

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python experiments/budget.py --study lr          # resumes; writes runs/budget/
  python experiments/budget.py --study length
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, REPO, REPORT_HELP, plot_lines, run, slice_of  # noqa: E402
from minprefix.env import load_env  # noqa: E402

COMMON = ["--epochs", "1", "--batch-size", "10", "--warmup", "0", "--weight-decay", "0", "--eval-every", "100",
          "--keep", "best"]
LRS = {"prefix-tuning": ("8e-5", "3e-4", "1e-3", "3e-3"), "LoRA": ("2e-4", "1e-3", "3e-3", "1e-2"),
       "fine-tuning": ("5e-5", "2e-4", "5e-4")}
METHOD = {"prefix-tuning": ["--mode", "kv", "--mlp", "--prefix-len", "5"],
          "LoRA": ["--mode", "lora", "--lora-rank", "4", "--lora-targets", "q,v"], "fine-tuning": ["--mode", "finetune"]}
LENGTHS = (1, 5, 10, 20)
VARIANTS = {"K/V prefix + MLP": ["--mode", "kv", "--mlp"], "K/V prefix (table)": ["--mode", "kv", "--no-mlp"],
            "embedding-only prefix": ["--mode", "embedding"]}


def data(write=True):
    return slice_of(os.path.join(DATA, "slice-5000"), 5000, 500, write=write)


def one(folder, flags, report=False):
    """One run at this budget (flags: the method's and its rate); report: its result if finished with these
    settings, else None (no data written, nothing trained)."""
    train_file, dev_file = data(write=not report)
    return run(folder, ["--data", train_file, "--val-data", dev_file, *COMMON, *flags], report=report)


def lr_study(out, report=False):
    results = {}
    for method, lrs in LRS.items():
        results[method] = {}
        for lr in lrs:
            if not report:
                print(f"== learning rate: {method} at {lr}", flush=True)
            r = one(os.path.join(out, "lr", f"{method}-{lr}"), [*METHOD[method], "--lr", lr], report)
            if r is not None:
                results[method][lr] = r
    return results


def best_prefix_lr(out, report=False):
    lr = lr_study(out, report)["prefix-tuning"]
    return max(lr, key=lambda k: lr[k]["scores"]["bleu"], default=None)  # None: no finished run to report


def length_study(out, report=False):
    lr = best_prefix_lr(out, report)
    results = {}
    for variant, flags in VARIANTS.items():
        results[variant] = {}
        for P in LENGTHS:
            if not report:
                print(f"== prefix length: {variant}, P={P}", flush=True)
            rate = lr if "MLP" in variant else "5e-3"
            if rate is None:  # --report before any lr run has finished: no rate, so no run to look for
                results[variant][P] = []
                continue
            kind = (f"{variant.split()[0].replace('/', '')}-{'mlp' if 'MLP' in variant else 'plain'}-{P}"
                    f"-lr{rate}")  # KV-mlp-5-lr3e-4: the MLP's rate is the lr study's best, which can change
            r = one(os.path.join(out, "length", kind), [*flags, "--prefix-len", str(P), "--lr", rate], report)
            results[variant][P] = [r] if r is not None else []
    return results, lr


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, choices=["lr", "length"])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "budget"), help="(default: runs/budget)")
    p.add_argument("--report", action="store_true", help=REPORT_HELP)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.study == "lr":
        results = lr_study(args.out, args.report)
        lines = ["| method | learning rate | kept step | held-out loss | BLEU | NIST | ROUGE-L | CIDEr | trained "
                 "parameters | train min |", "|---|---|---|---|---|---|---|---|---|---|"]
        for method, by_lr in results.items():
            for lr, r in by_lr.items():
                s = r["scores"]
                lines.append(f"| {method} | {lr} | {r['kept_step']} | {r['val_loss']:.3f} | {s['bleu']:.1f} | "
                             f"{'-' if s['nist'] is None else format(s['nist'], '.2f')} | {s['rouge_l']:.1f} | "
                             f"{s['cider']:.2f} | {r['trainable']:,} | {r['train_minutes']:.1f} |")
        plot_curves(results, os.path.join(args.out, "lr.png"))
        name = "lr"
    else:
        results, lr = length_study(args.out, args.report)
        plot_lines(os.path.join(args.out, "length.png"), f"prefix length, 5,000 pairs x 1 epoch (MLP at lr {lr})",
                   "prefix length P", results)
        lines = ["| prefix | " + " | ".join(f"P={P} BLEU / ROUGE-L" for P in LENGTHS) + " |",
                 "|---|" + "---|" * len(LENGTHS)]
        for variant, by_p in results.items():
            lines.append(f"| {variant} | " + " | ".join(f"{by_p[P][0]['scores']['bleu']:.1f} / "
                                                         f"{by_p[P][0]['scores']['rouge_l']:.1f}" if by_p[P] else "-"
                                                         for P in LENGTHS) + " |")
        name = "length"
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n\none run each; 5,000 pairs x 1 epoch, scored on the first 200 E2E test tables; "
                "imdb-gpt2-19m, NOT GPT-2.\n")
    print(f"wrote {args.out}/{name}.json, {name}.md, {name}.png")


def plot_curves(results, path):
    """Each run's held-out loss at every pass (train.py's history beside its checkpoint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (method, by_lr) in zip(axes[0], results.items()):
        for lr, r in by_lr.items():
            if r.get("curve"):
                ax.plot([v["step"] for v in r["curve"]], [v["loss"] for v in r["curve"]], "o-",
                        label=f"lr {lr}: BLEU {r['scores']['bleu']:.1f}")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (500 validation pairs)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("learning rates at 5,000 pairs x 1 epoch (imdb-gpt2-19m, NOT GPT-2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
