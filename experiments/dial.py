"""The sentiment dial, measured: does `python train.py --prefix-len 10 --mlp` give prefixes whose mix turns the
tone, on this project's data and on labelled text no one here wrote?

For each data set (data/: the summer-school reviews; movie-snippets: 600 training and 100 held-out movie-review
snippets built from the human ratings in ../shared/data/vader-snippets, rating >= 1.5 positive, <= -1.5 negative,
8 to 40 words, built at run time and never committed) and each recipe (the default; --recipe reference, the brief's
batch 2, lr 5e-5), it runs train.py with the README's main command, then eval.py: the held-out continuations and
the alpha sweep (24 samples x 10 neutral prompts per alpha) with 95% intervals, the dial's slope and whether it
is monotone. The same runs kept by the lowest held-out loss (--keep loss) instead of the steering margin are
evaluated beside them: which rule keeps the epoch that steers. It writes runs/dial/results.json,
runs/dial/dial.png and prints the table the README shows.

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python experiments/dial.py                   # resumes: finished runs, and evaluations made with the same
                                               # checkpoints (by content), base model and settings, are skipped
  python experiments/dial.py --data summer-school --methods kv-mlp lora --reference
"""
import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import eval as evaluate_script  # noqa: E402  (the scripts' own code, not copies of it)
import train as train_script  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from minprefix.method import read_meta  # noqa: E402
from minprefix.trainer import history_path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_model, differences, digest, flags  # noqa: E402

SNIPPETS = os.path.join(REPO, "..", "shared", "data", "vader-snippets", "movieReviewSnippets_GroundTruth.txt")
MOVIE_PROMPTS = ["The film", "The movie", "The plot", "The acting", "The director", "The story", "The cast",
                 "The ending", "The script", "The music"]
METHODS = {"kv-mlp": ["--prefix-len", "10", "--mlp"], "kv": ["--prefix-len", "10"],
           "embedding": ["--mode", "embedding", "--prefix-len", "10"], "lora": ["--mode", "lora"]}
RECIPES = {"steer": [], "reference": ["--recipe", "reference"], "keep-loss": ["--keep", "loss"]}


def build_snippets(folder, seed=0):
    """-> (train.jsonl, test.jsonl, sweep prompts file), written to folder from the VADER movie snippets."""
    paths = [os.path.join(folder, f) for f in ("train.jsonl", "test.jsonl", "sweep.txt")]
    if all(os.path.exists(p) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    by_label = {"positive": [], "negative": []}
    with open(SNIPPETS, encoding="utf-8", errors="replace") as f:
        for line in f:
            _, rating, text = line.rstrip("\n").split("\t", 2)
            text = " ".join(text.replace("''", '"').split())
            if 8 <= len(text.split()) <= 40 and abs(float(rating)) >= 1.5:
                by_label["positive" if float(rating) > 0 else "negative"].append(text)
    rng = random.Random(seed)
    splits = {"train": [], "test": []}
    for label, texts in by_label.items():
        rng.shuffle(texts)
        splits["train"] += [{"text": t, "sentiment": label} for t in texts[:300]]
        splits["test"] += [{"text": t, "sentiment": label} for t in texts[300:350]]
    for (name, rows), path in zip(splits.items(), paths):
        rng.shuffle(rows)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(paths[2], "w") as f:
        f.write("\n".join(MOVIE_PROMPTS) + "\n")
    return paths


def ckpt(data, method, recipe, out=os.path.join(REPO, "runs", "dial")):
    return os.path.join(out, data, f"{method}-{recipe}.safetensors")


def finished(path):
    """A run that did all its epochs: its history (train.py writes it beside the checkpoint) says so, or, for a run
    older than that, its resume state is gone and a checkpoint is there."""
    history = history_path(path)
    if os.path.exists(history):
        with open(history) as f:
            h = json.load(f)
        return h.get("finished") or len(h["step_loss"]) >= h["steps_per_epoch"] * read_meta(path)["info"]["epochs"]
    return os.path.exists(path) and not os.path.exists(path.removesuffix(".safetensors") + ".resume.pt")


def check_base(path):
    """A finished checkpoint is reused only for the base model this run would train on ($MINPREFIX_MODEL)."""
    model = train_script.parser().parse_args([]).model
    want = os.path.abspath(os.path.expanduser(model)) if os.path.isdir(os.path.expanduser(model)) else model
    if read_meta(path)["base_model"] != want:
        sys.exit(f"{path} was trained on base model {read_meta(path)['base_model']}, this run's is {want}: give "
                 f"--out another folder to keep both, or remove it to train it again")


def trained(out, data, method, recipe, train_data, test_data):
    """-> the checkpoint of a finished run, trained here first if need be: an unfinished run resumes from its
    state; one with none (Ctrl-C in its first epoch) starts again, its leftovers moved aside."""
    path = ckpt(data, method, recipe, out)
    if finished(path):
        check_base(path)
        return path
    again = ["--resume"] if os.path.exists(path.removesuffix(".safetensors") + ".resume.pt") else ["--overwrite"]
    print(f"== train {data}/{method}-{recipe}", flush=True)
    code = train_script.main(["--data", train_data, "--val-data", test_data, *METHODS[method], *RECIPES[recipe],
                              "--out", path, *again])
    if code:
        sys.exit(f"train.py stopped ({code}) on {path}: rerun to resume")
    return path


def evaluation(folder, ckpts, eval_args, what):
    """eval.py on these checkpoints with these arguments, into folder -> its eval.json. Reused only where the
    evaluation there was made with the same checkpoints (path and content: a checkpoint retrained in place is
    another), base model and arguments (folder/made_with.json); otherwise run again, saying why."""
    want = {"checkpoints": [{"path": os.path.abspath(p), "sha256": digest(p)} for p in ckpts],
            "base_model": base_model(read_meta(ckpts[0])["base_model"]), "eval_args": flags(eval_args)}
    result, record = os.path.join(folder, "eval.json"), os.path.join(folder, "made_with.json")
    why = None
    if not os.path.exists(result):
        why = ""
    elif not os.path.exists(record):
        why = " (the evaluation there did not record what made it)"
    else:
        with open(record) as f:
            differ = differences(json.load(f), want)
        if differ:
            why = " (the evaluation there was made with other settings: " + "; ".join(differ) + ")"
    if why is not None:
        print(f"== eval {what}{why}", flush=True)
        evaluate_script.main(["--prefix", *ckpts, *eval_args, "--out", folder])
        with open(record, "w") as f:
            json.dump(want, f, indent=2)
    with open(result) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "dial"), help="(default: runs/dial)")
    p.add_argument("--data", nargs="+", default=["summer-school", "movie-snippets"], help="(default: both)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="each with the default "
                   "recipe (default: all)")
    p.add_argument("--reference", nargs="*", default=["kv-mlp"], choices=list(METHODS), help="these also with "
                   "--recipe reference (default: kv-mlp)")
    p.add_argument("--keep-loss", nargs="*", default=["kv-mlp", "lora"], choices=list(METHODS),
                   help="these also kept by the lowest held-out loss (--keep loss) instead of the steering margin, "
                        "evaluated beside the others (default: kv-mlp lora)")
    p.add_argument("--sweep-samples", type=int, default=24, help="per neutral prompt and alpha (default: %(default)s)")
    args = p.parse_args()
    train_file, test_file, sweep_file = build_snippets(os.path.join(args.out, "movie-snippets-data"))
    datasets = {"summer-school": ("data/train.jsonl", "data/test.jsonl", None),
                "movie-snippets": (train_file, test_file, sweep_file)}
    results = {}
    for data in args.data:
        train_data, test_data, sweep = datasets[data]
        eval_args = ["--data", test_data, "--sweep-samples", str(args.sweep_samples),
                     *(["--sweep-prompts", sweep] if sweep else [])]
        ckpts = [trained(args.out, data, m, r, train_data, test_data)
                 for m, r in [(m, "steer") for m in args.methods] + [(m, "reference") for m in args.reference]]
        # the same runs, another epoch kept
        selection = [trained(args.out, data, m, "keep-loss", train_data, test_data) for m in args.keep_loss]
        results[data] = evaluation(os.path.join(args.out, data, "eval"), ckpts, eval_args, data)
        if selection:
            rows = evaluation(os.path.join(args.out, data, "eval-keep-loss"), selection, ["--no-base", *eval_args],
                              f"{data}, kept by the loss")["rows"]
            results[data]["rows"][-1:-1] = rows[:-1]  # before the held-out texts' own row
            ckpts += selection
        for path, row in zip(ckpts, results[data]["rows"][1:]):
            info = read_meta(path)["info"]
            row.update(checkpoint=os.path.relpath(path, REPO), kept_epoch=info["epoch"], epochs=info["epochs"],
                       selected_by=info.get("selected_by"), val_loss=info.get("val_loss"),
                       steer_margin=info.get("steer_margin"), steer_acc=info.get("steer_acc"), lr=info.get("lr"))
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path):  # the data sets evaluated before and not now stay in the table
        with open(path) as f:
            results = {**{k: v for k, v in json.load(f).items() if k not in results}, **results}
        results = {k: results[k] for k in sorted(results, key=lambda k: k != "summer-school")}
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    table = summary(results)
    print(table)
    plot(results, os.path.join(args.out, "dial.png"))
    print(f"wrote {args.out}/results.json, dial.png")


def summary(results):
    lines = ["| data | checkpoint | kept epoch (selected by) | held-out loss | steering margin [acc.] | VADER gap | "
             "alpha = 0 | 0.5 | 1 | dial slope [95% CI] | monotone | ends apart |", "|" + "---|" * 12]
    for data, result in results.items():
        for row in result["rows"][1:-1]:
            ci = lambda a: f"{row['alpha_sweep'][a]:+.3f} [{row['alpha_sweep_ci'][a][0]:+.3f}, {row['alpha_sweep_ci'][a][1]:+.3f}]"
            lo, hi = row["dial_slope_ci"]
            lines.append(f"| {data} | {row['checkpoint']} (lr {row['lr']:g}) | {row['kept_epoch']} of {row['epochs']} "
                         f"({row['selected_by']}) | {row['val_loss']:.4f} | {row['steer_margin']:+.4f} "
                         f"[{row['steer_acc']:.0%}] | {row['vader_gap']:+.3f} | {ci('0.0')} | {ci('0.5')} | {ci('1.0')} "
                         f"| {row['dial_slope']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                         f"{'yes' if row['dial_monotone'] else 'no'} | {'yes' if row['dial_ends_apart'] else 'no'} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (data, result) in zip(axes[0], results.items()):
        alphas = sorted(float(a) for a in result["rows"][1]["alpha_sweep"])
        rows = [(f"{os.path.basename(r['checkpoint']).removesuffix('.safetensors')} (lr {r['lr']:g})",
                 {k: {float(a): v for a, v in r[k].items()} for k in ("alpha_sweep", "alpha_sweep_ci")})
                for r in result["rows"][1:-1]]  # JSON's keys are strings: alpha as a number again
        evaluate_script.draw_sweep(ax, rows, alphas)
        ax.set_title(data)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
