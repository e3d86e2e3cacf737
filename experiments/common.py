"""What the E2E studies share: the data they are trained and scored on, one run (train.py, then eval.py --task e2e,
skipped when its result is there and was made with the same settings), and their figures. The runs are train.py's
and eval.py's own code, called with the flags a user would type.

Every study scores on the same fixed subset: the first TABLES of the 630 E2E test tables (all their references),
decoded as eval.py --task e2e decodes (the paper's beam 5, at most 100 new tokens, newlines banned; at least 5 new
tokens).
"""
import functools
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
from minprefix.data import file_digest, read_table_text, tables  # noqa: E402
from minprefix.e2e import DECODING  # noqa: E402

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


def subsample(folder, size, seed, words=None, write=True):
    """The paper's low-data sets: `size` training pairs drawn from E2E's training set, and a development set of 30%
    of that size (early stopping) drawn from its validation set. -> (train file, dev file); write False: their
    paths only."""
    tag = "-words" if words else ""
    train_file, dev_file = (os.path.join(folder, f"{s}{tag}.jsonl") for s in ("train", "dev"))
    if write and not (os.path.exists(train_file) and os.path.exists(dev_file)):
        rng = random.Random(seed)
        write_jsonl(train_file, rng.sample(pairs("train"), size), words)
        write_jsonl(dev_file, rng.sample(pairs("valid"), max(1, round(0.3 * size))), words)
    return train_file, dev_file


def slice_of(folder, n_train, n_dev, write=True):
    """The first n_train training pairs and n_dev validation pairs, as files: the larger budget's data."""
    train_file, dev_file = os.path.join(folder, "train.jsonl"), os.path.join(folder, "dev.jsonl")
    if write and not (os.path.exists(train_file) and os.path.exists(dev_file)):
        write_jsonl(train_file, pairs("train")[:n_train])
        write_jsonl(dev_file, pairs("valid")[:n_dev])
    return train_file, dev_file


def test_file(folder, words=None, write=True):
    """The first TABLES test tables with every reference of theirs, as source -> text pairs."""
    path = os.path.join(folder, f"test-{TABLES}{'-words' if words else ''}.jsonl")
    if write and not os.path.exists(path):
        keep = {t for t, _ in tables(read_table_text(os.path.join(E2E, "test.txt.gz")))[:TABLES]}
        write_jsonl(path, [(t, x) for t, x in pairs("test") if t in keep], words)
    return path


REPORT_HELP = "train nothing: write the table and figure from the runs finished so far (each cell says how many)"


@functools.lru_cache(maxsize=None)
def _digest(path, size, mtime):  # a file's sha256, once per version of it in this process
    return file_digest(path)


def digest(path):
    """sha256 of a file's bytes, or None where there is no such file."""
    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def base_model(name_or_path):
    """What identifies a base model: a local folder by its config and its weights' digests (where it lies does
    not change what it computes), a hub name by its name."""
    if not os.path.isdir(name_or_path):
        return {"name": name_or_path}
    with open(os.path.join(name_or_path, "config.json")) as f:
        config = json.load(f)
    weights = sorted(f for f in os.listdir(name_or_path) if f.endswith(".safetensors"))
    return {"config": config, "weights_sha256": {f: digest(os.path.join(name_or_path, f)) for f in weights}}


def flags(argv):
    """train.py's argument list -> {flag: value} (True for a flag alone), a file's path replaced by its digest:
    the data decides a run, not where it lies."""
    out, i = {}, 0
    while i < len(argv):
        flag, value = argv[i].split("=", 1) if "=" in argv[i] else (argv[i], None)
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i, value = i + 1, argv[i + 1]
        out[flag] = True if value is None else {"sha256": digest(value)} if os.path.isfile(value) else value
        i += 1
    return out


def made_with(train_args, words=None, dtype="float32", write=True):
    """Everything that makes a study run's result: train.py's arguments (data files by digest), the base model it
    loads (--model, else $MINPREFIX_MODEL, as train.py decides), the dtype, and the test tables it is scored on and
    how they are decoded. write False: the test tables' file is not written where it is missing."""
    model = train_script.parser().parse_args(list(train_args)).model
    return {"train_args": flags(list(train_args)), "base_model": base_model(model), "dtype": dtype,
            "test_tables": TABLES, "test_data_sha256": digest(test_file(DATA, words, write=write)),
            "decoding": {k: list(v) if isinstance(v, tuple) else v for k, v in DECODING.items()}}


def differences(old, new, where=""):
    """-> ["key: old -> new", ...] for each leaf where two made_with dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))]
    if old == new:
        return []
    short = lambda v: (s if len(s := json.dumps(v)) <= 60 else s[:57] + "...")
    return [f"{where}: {short(old)} -> {short(new)}"]


def run(folder, train_args, words=None, dtype="float32", report=False):
    """One study run: train.py with train_args (--out is folder's checkpoint), then eval.py --task e2e on the test
    subset. Skipped when folder/result.json exists and was made with the same settings (made_with); one made with
    others is refused, naming what differs (rerunning would replace it). -> the result: scores, and what train.py
    kept (None when report is set and the run has not finished, or finished with other settings)."""
    result_file = os.path.join(folder, "result.json")
    want = made_with(train_args, words, dtype, write=not report)
    if os.path.exists(result_file):
        with open(result_file) as f:
            result = json.load(f)
        differ = (differences(result["made_with"], want) if result.get("made_with") else
                  ["settings not recorded (a result from before results recorded what made them)"])
        if not differ:
            if "blank" not in result and os.path.exists(os.path.join(folder, "eval", "e2e_outputs.txt")):
                result["blank"] = blank_share(folder)  # a result from before it was recorded
            return result
        why = f"{folder}: its result was made with other settings than this run's: " + "; ".join(differ)
        if report:
            print(f"{why}; left out", file=sys.stderr)
            return None
        sys.exit(f"{why}. Give the study another --out to keep both, or remove {folder} to run it again")
    if report:
        return None
    os.makedirs(folder, exist_ok=True)
    finetune = "finetune" in train_args
    ckpt = os.path.join(folder, "model" if finetune else "checkpoint.safetensors")
    t0 = time.time()
    # --overwrite: an unfinished run's leftovers (Ctrl-C) are moved aside, the run started again
    code = train_script.main([*train_args, "--out", ckpt, "--dtype", dtype, "--overwrite"])
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
              "train_args": train_args, "samples": evaluated["samples"][:2], "blank": blank_share(folder),
              "curve": [{k: v.get(k) for k in ("step", "loss")} for v in history["val"]], "made_with": want}
    if finetune:  # the folder holds a whole model: a study needs only its scores
        import shutil
        shutil.rmtree(ckpt)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=2)
    return result


def blank_share(folder):
    """The share of a run's test outputs that are empty or only spaces (eval/e2e_outputs.txt, one line per table):
    where a method collapses to them, BLEU and ROUGE-L measure the collapse, not the text."""
    with open(os.path.join(folder, "eval", "e2e_outputs.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # one line per table, each ended by a newline
    return sum(not line.strip() for line in lines) / len(lines)


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
    names = {"bleu": "BLEU", "rouge_l": "ROUGE-L", "nist": "NIST", "cider": "CIDEr",
             "blank": "% of outputs empty or only spaces"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, points in series.items():
            # a score (NIST None: 0), or the blank share in % where the run recorded it
            got = {x: [r["scores"][metric] or 0.0 for r in points[x]] if metric != "blank" else
                   [100 * r["blank"] for r in points[x] if r.get("blank") is not None] for x in points}
            xs = sorted(x for x in got if got[x])  # sizes with a finished run
            if not xs:
                continue
            values = [got[x] for x in xs]
            means = [statistics.mean(v) for v in values]
            ax.plot(xs, means, "o-", label=name)
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for p in series.values() for x in p}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # the sizes alone, no 3 x 10^2
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{names[metric]}\n({TABLES} E2E test tables)" if metric == "blank" else
                      f"{names[metric]} ({TABLES} E2E test tables)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title + "  (imdb-gpt2-19m, NOT GPT-2; mean, band: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
