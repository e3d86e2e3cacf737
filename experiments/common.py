"""What the E2E studies share: the data they are trained and scored on, one run (train.py, then eval.py --task e2e,
skipped when its result is there), and their figures. The runs are train.py's and eval.py's own code, called
with the flags a user would type.

Every study scores on the same fixed subset: the first TABLES of the 630 E2E test tables (all their references),
decoded as eval.py --task e2e decodes (the paper's: beam 5, at least 5 and at most 100 new tokens, newlines banned).
"""
import json
import os
import random
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402
from minprefix.data import read_table_text, tables  # noqa: E402

E2E = os.path.join(REPO, "..", "shared", "data", "e2e")
TABLES = 200  # the test tables every study run is scored on
TASK_WORDS = "table-to-text:"  # the paper's low-data words: the prefix starts from them, fine-tuning reads them
DATA = os.path.join(REPO, "runs", "e2e-data")  # the data files the studies write (never committed)


def pairs(split):
    return [(e.source, e.text) for e in read_table_text(os.path.join(E2E, f"{split}.txt.gz"))]


def write_jsonl(path, rows, words=None):
    """rows [(table, text)] -> JSON Lines {"source", "text"}; words: put before every table (fine-tuning's and
    LoRA's task words in the paper's low-data runs, where the prefix-tuning runs start the prefix from them)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for table, text in rows:
            f.write(json.dumps({"source": f"{words} {table}" if words else table, "text": text}) + "\n")
    return path


def subsample(folder, size, seed, words=None):
    """The paper's low-data sets: `size` training pairs drawn from E2E's training set, and a development set of 30%
    of that size (early stopping) drawn from its validation set. -> (train file, dev file)."""
    tag = "-words" if words else ""
    train_file, dev_file = (os.path.join(folder, f"{s}{tag}.jsonl") for s in ("train", "dev"))
    if not (os.path.exists(train_file) and os.path.exists(dev_file)):
        rng = random.Random(seed)
        write_jsonl(train_file, rng.sample(pairs("train"), size), words)
        write_jsonl(dev_file, rng.sample(pairs("valid"), max(1, round(0.3 * size))), words)
    return train_file, dev_file


def slice_of(folder, n_train, n_dev):
    """The first n_train training pairs and n_dev validation pairs, as files: the larger budget's data."""
    train_file, dev_file = os.path.join(folder, "train.jsonl"), os.path.join(folder, "dev.jsonl")
    if not (os.path.exists(train_file) and os.path.exists(dev_file)):
        write_jsonl(train_file, pairs("train")[:n_train])
        write_jsonl(dev_file, pairs("valid")[:n_dev])
    return train_file, dev_file


def test_file(folder, words=None):
    """The first TABLES test tables with every reference of theirs, as source -> text pairs."""
    path = os.path.join(folder, f"test-{TABLES}{'-words' if words else ''}.jsonl")
    if not os.path.exists(path):
        keep = {t for t, _ in tables(read_table_text(os.path.join(E2E, "test.txt.gz")))[:TABLES]}
        write_jsonl(path, [(t, x) for t, x in pairs("test") if t in keep], words)
    return path


REPORT_HELP = "train nothing: write the table and figure from the runs finished so far (each cell says how many)"


def run(folder, train_args, words=None, dtype="float32", report=False):
    """One study run: train.py with train_args (--out is folder's checkpoint), then eval.py --task e2e on the test
    subset. Skipped when folder/result.json exists. -> the result: scores, and what train.py kept (None when report
    is set and the run has not finished)."""
    result_file = os.path.join(folder, "result.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            return json.load(f)
    if report:
        return None
    os.makedirs(folder, exist_ok=True)
    finetune = "finetune" in train_args
    ckpt = os.path.join(folder, "model" if finetune else "checkpoint.safetensors")
    t0 = time.time()
    code = train_script.main([*train_args, "--out", ckpt, "--dtype", dtype])
    if code:
        sys.exit(f"train.py stopped ({code}) in {folder}: rerun to start this run again")
    minutes = (time.time() - t0) / 60
    t0 = time.time()
    eval_script.main(["--task", "e2e", "--prefix", ckpt, "--data", test_file(DATA, words), "--out",
                      os.path.join(folder, "eval"), "--dtype", dtype])
    with open(os.path.join(folder, "eval", "eval.json")) as f:
        evaluated = json.load(f)
    from minprefix.method import read_meta
    from minprefix.trainer import history_path
    info = read_meta(ckpt)["info"]
    with open(history_path(ckpt)) as f:
        history = json.load(f)
    result = {"scores": evaluated["scores"], "train_minutes": minutes, "decode_minutes": (time.time() - t0) / 60,
              "kept_step": info.get("step"), "val_loss": info.get("val_loss"), "trainable": info.get("trainable_params"),
              "train_args": train_args, "samples": evaluated["samples"][:2],
              "curve": [{k: v.get(k) for k in ("step", "loss")} for v in history["val"]]}
    if finetune:  # the folder holds a whole model: a study needs only its scores
        import shutil
        shutil.rmtree(ckpt)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=2)
    return result


def spread(values):
    """-> (mean, sample standard deviation, min, max) of a list of scores."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd, min(values), max(values)


def fmt(values, digits=1, expected=None):
    """mean ± sd [min-max]; '-' for no runs, and the count where fewer than expected have finished."""
    if not values:
        return "-"
    mean, sd, lo, hi = spread(values)
    short = f" (n={len(values)})" if expected and len(values) < expected else ""
    return f"{mean:.{digits}f} ± {sd:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]{short}"


def plot_lines(path, title, xlabel, series, metrics=("bleu", "rouge_l"), log_x=False):
    """series {name: {x: [result, ...]}} -> one panel per metric: mean and min-max band against x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"bleu": "BLEU", "rouge_l": "ROUGE-L", "nist": "NIST", "cider": "CIDEr"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, points in series.items():
            xs = sorted(x for x in points if points[x])  # sizes with a finished run
            if not xs:
                continue
            values = [[r["scores"][metric] or 0.0 for r in points[x]] for x in xs]
            means = [statistics.mean(v) for v in values]
            ax.plot(xs, means, "o-", label=name)
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for p in series.values() for x in p}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # the sizes alone, no 3 x 10^2
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{names[metric]} ({TABLES} E2E test tables)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title + "  (imdb-gpt2-19m, NOT GPT-2; mean, band: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
