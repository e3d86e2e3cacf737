"""Steering that wins, measured as controlled-generation papers measure it: from neutral prompts, the share of
continuations with the tone asked for at each end of the dial (VADER, AFINN beside it), against the fluency it
costs (perplexity under the bare model, over that of the bare model's own samples from the same prompts), for
every way this project has of turning the dial, on both data sets experiments/dial.py uses.

Runs (train.py, the README's main command with the contrastive weight set explicitly), per data set:
  kv-mlp-c0      K/V prefix with its MLP, no contrastive term (plain prefix-tuning)
  kv-mlp-c<L>    the same with the contrastive term at each --lambdas (Qian et al. 2022)
  lora-c0, lora-c<L>   LoRA r=4 on q, v, without and with the term (--lora-lambda)
each evaluated (eval.py --n-samples 0: the neutral prompts only) at each --guidance strength at the logits
(DExperts-style, minprefix/guidance.py; 0 is the K/V mix alone), --sweep-samples x 10 prompts per alpha (24: 240
continuations per end, per point), with the bare model's own samples beside them. Finished runs and evaluations
made with the same settings are read back, not redone.

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python experiments/steer.py                         # both data sets (hours on a 2-core CPU); resumes
  python experiments/steer.py --data summer-school --methods kv-mlp --lambdas 1 --guidance 0 2
It writes runs/steer/results.json, experiments/figures/frontier.png and prints the tables docs/results.md shows.
"""
import argparse
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval as evaluate_script  # noqa: E402  (the scripts' own code, not copies of it)
import train as train_script  # noqa: E402
from dial import build_snippets, finished  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from minprefix.method import read_meta  # noqa: E402

METHODS = {"kv-mlp": ["--prefix-len", "10", "--mlp"], "lora": ["--mode", "lora"]}


def made_with(paths, settings):
    """What an evaluation is made of: each checkpoint's bytes (a run retrained at the same path is another) and
    every setting. An evaluation is read back only when this is equal."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests.append(h.hexdigest())
    return {"checkpoints": [os.path.relpath(p, REPO) for p in paths], "sha256": digests, **settings}


def train(name, path, data, methods_args, lam):
    if finished(path):
        return
    resume = ["--resume"] if os.path.exists(path.removesuffix(".safetensors") + ".resume.pt") else []
    print(f"== train {name}", flush=True)
    code = train_script.main(["--data", data[0], "--val-data", data[1], *methods_args, "--contrastive", str(lam),
                              "--out", path, *resume])
    if code:
        sys.exit(f"train.py stopped ({code}) on {name}: rerun to resume")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "steer"), help="(default: runs/steer)")
    p.add_argument("--data", nargs="+", default=["summer-school", "movie-snippets"], help="(default: both)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0],
                   help="contrastive weights for the K/V prefix with its MLP (default: %(default)s)")
    p.add_argument("--lora-lambda", type=float, default=1.0,
                   help="LoRA with the contrastive term at this weight, beside LoRA without (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS),
                   help="which runs: each without and with the contrastive term (default: both)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                   help="strengths evaluated for each run (default: %(default)s)")
    p.add_argument("--sweep-samples", type=int, default=24, help="per neutral prompt and alpha (default: %(default)s)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0],
                   help="the sweep's alphas; the frontier needs 0 and 1 (default: %(default)s)")
    args = p.parse_args()
    train_file, test_file, sweep_file = build_snippets(os.path.join(REPO, "runs", "dial", "movie-snippets-data"))
    datasets = {"summer-school": ("data/train.jsonl", "data/test.jsonl", None),
                "movie-snippets": (train_file, test_file, sweep_file)}
    runs = [("kv-mlp", 0.0)] + [("kv-mlp", lam) for lam in args.lambdas if lam] + [("lora", 0.0)] + (
        [("lora", args.lora_lambda)] if args.lora_lambda else [])
    runs = [(method, lam) for method, lam in runs if method in args.methods]
    results = {}
    for data in args.data:
        train_data, test_data, sweep = datasets[data]
        paths = []
        for method, lam in runs:
            path = os.path.join(args.out, data, f"{method}-c{lam:g}.safetensors")
            train(f"{data}/{method}-c{lam:g}", path, (train_data, test_data), METHODS[method], lam)
            paths.append(path)
        folder = os.path.join(args.out, data, "eval")
        settings = {"guidance": args.guidance, "sweep_samples": args.sweep_samples, "alphas": args.alphas,
                    "sweep_prompts": sweep, "base_model": read_meta(paths[0])["base_model"]}
        want = made_with(paths, settings)
        stamp = os.path.join(folder, "made_with.json")
        if not (os.path.exists(stamp) and json.load(open(stamp)) == want):
            print(f"== eval {data}", flush=True)
            evaluate_script.main(["--prefix", *paths, "--data", test_data, "--n-samples", "0",
                                  "--sweep-samples", str(args.sweep_samples), "--guidance", *map(str, args.guidance),
                                  "--alphas", *map(str, args.alphas), "--out", folder,
                                  *(["--sweep-prompts", sweep] if sweep else [])])
            with open(stamp, "w") as f:
                json.dump(want, f, indent=2)
        rows = json.load(open(os.path.join(folder, "eval.json")))["rows"]
        names = iter([(m, lam, g) for m, lam in runs for g in args.guidance])
        for row in rows:
            if "neutral" in row and row["name"] != evaluate_script.row_name(None):
                row["method"], row["contrastive"], row["guidance"] = next(names)
        results[data] = [r for r in rows if "neutral" in r]
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path):  # data sets evaluated before and not now stay in the table
        with open(path) as f:
            results = {**{k: v for k, v in json.load(f).items() if k not in results}, **results}
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    for data, rows in results.items():
        print(f"\n{data}\n\n{table(rows)}")
    figure = os.path.join(REPO, "experiments", "figures", "frontier.png")
    plot(results, figure)
    print(f"\nwrote {path}, {os.path.relpath(figure, REPO)}")


def table(rows):
    """One row per point: the ends' shares (VADER with its 95% interval, AFINN), how far beyond the bare model's own
    share, the ends' mean VADER apart, perplexity over the bare model's own samples', distinct-2 and -3."""
    bare = rows[0]["neutral"]
    lines = ["| method | contrastive | guidance | positive at alpha 1 (VADER [95% CI] / AFINN) | negative at alpha 0 "
             "(VADER [95% CI] / AFINN) | beyond the bare model (points, + / -) | ends' mean VADER apart | "
             "perplexity (x the bare model's) | distinct-2 / -3 |", "|" + "---|" * 9]
    for r in rows:
        n = r["neutral"]
        v, a = n["VADER"], n["AFINN"]
        is_bare = n is bare
        sweep = r.get("alpha_sweep")
        lam = "" if is_bare else f"{r['contrastive']:g}"
        g = "" if is_bare else f"{r['guidance']:g}"
        beyond = "" if is_bare else (f"{100 * (v['positive'] - bare['VADER']['positive']):+.0f} / "
                                     f"{100 * (v['negative'] - bare['VADER']['negative']):+.0f}")
        apart = f"{sweep['1.0'] - sweep['0.0']:.2f}" if sweep else ""
        lines.append(
            f"| {'bare model, its own samples' if is_bare else r['method']} | {lam} | {g} | "
            f"{v['positive']:.0%} [{v['positive_ci'][0]:.0%}, {v['positive_ci'][1]:.0%}] / {a['positive']:.0%} | "
            f"{v['negative']:.0%} [{v['negative_ci'][0]:.0%}, {v['negative_ci'][1]:.0%}] / {a['negative']:.0%} | "
            f"{beyond} | {apart} | {n['perplexity']:.1f} ({n['perplexity'] / bare['perplexity']:.2f}x) | "
            f"{n['distinct2']:.3f} / {n['distinct3']:.3f} |")
    return "\n".join(lines)


def plot(results, path):
    """The control-fluency frontier: one panel per data set, x = the ends' perplexity over the bare model's own
    samples', y = the share of the ends with the tone asked for (VADER, the mean of the two ends), 95% intervals;
    one line per run through its guidance strengths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    for ax, (data, rows) in zip(axes[0], results.items()):
        bare = rows[0]["neutral"]
        share = lambda n: (n["VADER"]["positive"] + n["VADER"]["negative"]) / 2
        half = lambda n: ((n["VADER"]["positive_ci"][1] - n["VADER"]["positive_ci"][0])
                          + (n["VADER"]["negative_ci"][1] - n["VADER"]["negative_ci"][0])) / 4
        ax.errorbar([1.0], [share(bare)], yerr=[half(bare)], fmt="k*", ms=12, capsize=3,
                    label="bare model (its own tone, either end)")
        groups = {}
        for r in rows[1:]:
            groups.setdefault((r["method"], r["contrastive"]), []).append(r)
        for (method, lam), group in groups.items():
            group.sort(key=lambda r: r["guidance"])
            xs = [r["neutral"]["perplexity"] / bare["perplexity"] for r in group]
            ys = [share(r["neutral"]) for r in group]
            line = ax.errorbar(xs, ys, yerr=[half(r["neutral"]) for r in group], fmt="o-", capsize=3,
                               label=f"{method}, contrastive {lam:g}")
            for r, x, y in zip(group, xs, ys):
                ax.annotate(f"g{r['guidance']:g}", (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points",
                            color=line[0].get_color())
        ax.axvline(2.0, color="grey", ls=":", lw=1)
        ax.axhline(0.8, color="grey", ls=":", lw=1)
        ax.set_xlabel("perplexity under the bare model, x its own samples' (fluency's cost)")
        ax.set_ylabel("share with the tone asked for, both ends (VADER)")
        ax.set_title(f"{data}: control against fluency (g = guidance)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
