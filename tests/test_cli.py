"""train.py -> sample.py -> eval.py end to end on the offline model, and their errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import torch

from conftest import REPO, SHARED
from minprefix.prefix import load_prefix


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A slice of the shipped splits, so the end-to-end runs take seconds."""
    folder = tmp_path_factory.mktemp("data")
    for split, n in (("train", 24), ("test", 8)):
        lines = (REPO / f"data/{split}.jsonl").read_text().splitlines()
        (folder / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(offline_model_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "prefix.safetensors"
    p = run("train.py", "--model", offline_model_dir, "--data", small_data / "train.jsonl",
            "--val-data", small_data / "test.jsonl", "--prefix-len", 10, "--mlp", "--epochs", 2, "--out", out)
    return out, p.stdout


def test_train_writes_a_small_checkpoint_and_a_loss_curve(trained, offline_model):
    out, stdout = trained
    assert "trainable parameters" in stdout and "saved" in stdout and "held-out loss" in stdout
    prefix, meta = load_prefix(out, offline_model)
    assert meta["labels"] == ["positive", "negative"] and meta["mode"] == "kv" and meta["prefix_len"] == 10
    assert meta["info"]["epochs_done"] == 2 and not meta["info"]["interrupted"]
    assert prefix.table().numel() < 0.01 * offline_model.num_params()
    assert out.with_suffix(".loss.png").stat().st_size > 10_000
    assert "kept epoch" in stdout


def samples(p):
    return [l for l in p.stdout.splitlines() if l.startswith("[")]


def test_sample_alpha_mixes_the_prefixes(trained):
    """Same seed throughout: alpha 1 writes what the positive prefix writes, alpha 0 the negative's, and 0.5
    neither (were alpha ignored, all three would be the same)."""
    out = {}
    for args in (("--alpha", "1.0"), ("--alpha", "0.0"), ("--alpha", "0.5"), ("--sentiment", "positive"),
                 ("--sentiment", "negative")):
        p = run("sample.py", "--prefix", trained[0], *args, "--n", 2, "--max-new-tokens", 12, "--seed", 1)
        out[args] = samples(p)
        assert len(out[args]) == 2
    assert out[("--alpha", "1.0")] == out[("--sentiment", "positive")]
    assert out[("--alpha", "0.0")] == out[("--sentiment", "negative")]
    assert len({tuple(v) for v in out.values()}) == 3


def test_sample_is_seeded(trained):
    a = run("sample.py", "--prefix", trained[0], "--sentiment", "negative", "--n", 2, "--max-new-tokens", 10, "--seed", 3)
    b = run("sample.py", "--prefix", trained[0], "--sentiment", "negative", "--n", 2, "--max-new-tokens", 10, "--seed", 3)
    assert a.stdout == b.stdout


def test_sample_refuses_alpha_outside_0_1_unless_asked(trained):
    p = run("sample.py", "--prefix", trained[0], "--alpha", "1.5", check=False)
    assert p.returncode == 2 and "--alpha must be in [0, 1]" in p.stderr and "--extrapolate" in p.stderr
    run("sample.py", "--prefix", trained[0], "--alpha", "1.5", "--extrapolate", "--n", 1, "--max-new-tokens", 5)


def test_sample_unknown_sentiment(trained):
    p = run("sample.py", "--prefix", trained[0], "--sentiment", "neutral", check=False)
    assert p.returncode == 2 and "this prefix knows positive, negative" in p.stderr


def test_eval_writes_table_json_and_plot(trained, small_data, tmp_path):
    p = run("eval.py", "--prefix", trained[0], "--data", small_data / "test.jsonl", "--n-samples", 1,
            "--sweep-samples", 1, "--max-new-tokens", 8, "--out", tmp_path)
    assert "| base model, no prefix |" in p.stdout and "| K/V prefix + MLP, P=10 |" in p.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in result["rows"]][:2] == ["base model, no prefix", "K/V prefix + MLP, P=10"]
    lo, hi = result["rows"][1]["acc_intended_ci"]
    assert lo <= result["rows"][1]["acc_intended"] <= hi and "[" in p.stdout  # accuracies with their interval
    assert set(result["rows"][1]["alpha_sweep"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert (tmp_path / "alpha_sweep.png").stat().st_size > 10_000 and (tmp_path / "eval.md").is_file()


def test_train_rejects_bad_prefix_len(offline_model_dir, small_data, tmp_path):
    for bad in ("0", "5000"):
        p = run("train.py", "--model", offline_model_dir, "--data", small_data / "train.jsonl", "--prefix-len", bad,
                "--out", tmp_path / "x.safetensors", check=False)
        assert p.returncode == 2 and "--prefix-len must be between 1 and 1022" in p.stderr


def test_train_reports_bad_data_with_file_and_line(offline_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "sentiment": "positive"}\n{"text": "no label"}\n')
    p = run("train.py", "--model", offline_model_dir, "--data", bad, "--out", tmp_path / "x.safetensors", check=False)
    assert p.returncode != 0 and f"{bad}:2: missing field 'sentiment'" in p.stderr and "Traceback" not in p.stderr


def train_until(args, line_starts, cwd=REPO):
    """Start train.py, wait for a line of its output that starts with line_starts, then press Ctrl-C."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith(line_starts):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def test_ctrl_c_keeps_a_usable_checkpoint(offline_model_dir, offline_model, tmp_path):
    out = tmp_path / "prefix.safetensors"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model", str(offline_model_dir), "--mlp",
                             "--epochs", "50", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:  # wait until training has begun, then let it take some steps
        if line.startswith("prefix ("):
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout
    prefix, meta = load_prefix(out, offline_model)
    assert meta["info"]["interrupted"] and 0 < meta["info"]["steps"] < 50 * 130


def test_resume_after_ctrl_c_ends_with_the_uninterrupted_prefix(offline_model_dir, small_data, tmp_path):
    common = ["--model", offline_model_dir, "--data", small_data / "train.jsonl", "--val-data",
              small_data / "test.jsonl", "--mlp", "--epochs", 3, "--keep", "last", "--lr", "1e-3"]
    run("train.py", *common, "--out", tmp_path / "whole.safetensors")
    out = tmp_path / "resumed.safetensors"
    code, stdout, _ = train_until([*common, "--out", out], "epoch 1:")
    assert code == 130 and "--resume continues after epoch 1" in stdout
    p = run("train.py", *common, "--out", out, "--resume")
    assert "resuming after epoch 1 of 3" in p.stdout + p.stderr and "kept epoch 3" in p.stdout
    a, _ = load_prefix(tmp_path / "whole.safetensors")
    b, meta = load_prefix(out)
    assert (a.table() - b.table()).abs().max().item() <= 1e-6 and meta["info"]["epoch"] == 3
    # another learning rate, other data, another base model: refused by name
    p = run("train.py", *[c if c != "1e-3" else "2e-3" for c in common], "--out", out, "--resume", check=False)
    assert p.returncode == 2 and "lr = 0.001, this one asks for 0.002" in p.stderr
    other = tmp_path / "other.jsonl"
    other.write_text((small_data / "train.jsonl").read_text().replace("great", "fine"))
    p = run("train.py", *common[:3], other, *common[4:], "--out", out, "--resume", check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "data" in p.stderr


def test_trained_checkpoint_loads_from_another_folder(trained, tmp_path):
    """The base model's folder is recorded as an absolute path: sample.py runs from anywhere."""
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prefix", str(trained[0]), "--n", "1",
                        "--max-new-tokens", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_prompts_file_batched_equals_each_prompt_alone(trained, tmp_path):
    prompts = ["The food", "I went to the labs because the mentors", "", "Our mentor said that"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    p = run("sample.py", "--prefix", trained[0], "--prompts-file", tmp_path / "prompts.txt", "--temperature", 0,
            "--max-new-tokens", 25, "--alpha", 0.8, "--output", tmp_path / "out.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["alpha"] == 0.8 for r in rows)
    for prompt, row in zip(prompts, rows):
        alone = run("sample.py", "--prefix", trained[0], "--prompt", prompt, "--n", 1, "--temperature", 0,
                    "--max-new-tokens", 25, "--alpha", 0.8, "--output", tmp_path / "one.jsonl")
        assert json.loads((tmp_path / "one.jsonl").read_text())["text"] == row["text"]
    assert samples(p) == [f"[{i + 1}] {q}{r['text']}" for i, (q, r) in enumerate(zip(prompts, rows))]  # in order
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prefix", str(trained[0]), "--prompts-file", "-",
                        "--temperature", "0", "--max-new-tokens", "25", "--alpha", "0.8"], input="\n".join(prompts),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert samples(p) == [f"[{i + 1}] {q}{r['text']}" for i, (q, r) in enumerate(zip(prompts, rows))]  # stdin


def test_sample_streams_at_a_terminal(trained):
    """At a terminal with --n 1 the text arrives a few characters at a time, not in one piece at the end."""
    import pty
    import select
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--prefix", str(trained[0]), "--n", "1",
                             "--max-new-tokens", "40", "--temperature", "0.8", "--prompt", "The lectures"],
                            cwd=REPO, stdout=follower, stderr=subprocess.PIPE, close_fds=True)
    os.close(follower)
    chunks, text = 0, b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(leader, 1024)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        if b"[1]" in text + data or text.count(b"[1]"):
            chunks += 1
        text += data
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0 and b"[1] The lectures" in text
    assert chunks > 5, f"the sample came in {chunks} pieces"


def test_e2e_slice_end_to_end(offline_model_dir, tmp_path):
    """A tiny E2E run: a few training steps on table||text lines, a few test tables decoded with beams, scored
    with the official metrics; and the fine-tuning baseline saved as a model folder and evaluated the same way."""
    e2e = SHARED / "data/e2e"
    common = ["--model", offline_model_dir, "--data", e2e / "train.txt.gz", "--limit", 30, "--val-limit", 10,
              "--epochs", 1]
    p = run("train.py", *common, "--out", tmp_path / "e2e.safetensors")
    assert "source -> text; 30 training and 10 held-out examples" in p.stdout
    assert "(kv, MLP, 5 positions)" in p.stdout and "lr 8e-05, batch 10, 1 epochs" in p.stdout  # the paper's recipe
    p = run("eval.py", "--task", "e2e", "--prefix", tmp_path / "e2e.safetensors", "--data", e2e / "test.txt.gz",
            "--limit", 3, "--max-new-tokens", 12, "--out", tmp_path / "eval")
    outputs = (tmp_path / "eval/e2e_outputs.txt").read_text().splitlines()
    refs = (tmp_path / "eval/e2e_refs.txt").read_text().split("\n\n")
    result = json.loads((tmp_path / "eval/eval.json").read_text())
    assert len(outputs) == 3 and len(refs) == 3 and all(refs)
    assert set(result["scores"]) == {"bleu", "nist", "rouge_l", "cider"}
    assert result["settings"]["num_beams"] == 5 and result["settings"]["banned"] == [198, 628]
    assert "| BLEU | NIST | ROUGE-L | CIDEr |" in p.stdout
    run("train.py", *common, "--mode", "finetune", "--out", tmp_path / "ft")
    p = run("eval.py", "--task", "e2e", "--model", tmp_path / "ft", "--limit", 2, "--max-new-tokens", 8,
            "--out", tmp_path / "eval-ft")
    assert "fine-tuned" in p.stdout and len((tmp_path / "eval-ft/e2e_outputs.txt").read_text().splitlines()) == 2


def test_e2e_bad_line_is_named(offline_model_dir, tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("name : X | Type : pub||X is a pub .\nname : Y | Type : pub\n")
    p = run("train.py", "--model", offline_model_dir, "--data", bad, "--out", tmp_path / "x.safetensors", check=False)
    assert p.returncode == 1 and f"{bad}:2: expected one 'table||text' pair" in p.stderr


def test_bad_flag_values_are_named(trained, offline_model_dir, small_data, tmp_path):
    for script, args, message in (
            ("train.py", ["--keep", "worst"], "argument --keep: invalid choice: 'worst'"),
            ("train.py", ["--dtype", "float8"], "argument --dtype: invalid choice"),
            ("train.py", ["--mode", "finetune", "--mlp"], "--mlp reparametrizes the K/V prefix"),
            ("train.py", ["--limit", "0"], "--limit must be at least 1"),
            ("sample.py", ["--prefix", trained[0], "--top-p", "0"], "--top-p must be in (0, 1]"),
            ("sample.py", ["--prefix", trained[0], "--prompts-file", tmp_path / "none.txt"], "none.txt"),
            ("eval.py", ["--prefix", trained[0], "--task", "e2e"], "is a prefix for labelled text")):
        extra = ["--model", offline_model_dir, "--data", small_data / "train.jsonl"] if script == "train.py" else []
        p = run(script, *extra, *args, check=False)
        assert p.returncode != 0 and message in p.stderr, (script, args, p.stderr[-500:])
        assert "Traceback" not in p.stderr


def test_bfloat16_end_to_end(trained, offline_model_dir, small_data, tmp_path):
    """Half precision: training keeps the prefix in float32, sampling and the model run in bfloat16."""
    out = tmp_path / "bf16.safetensors"
    run("train.py", "--model", offline_model_dir, "--data", small_data / "train.jsonl", "--val-data",
        small_data / "test.jsonl", "--epochs", 1, "--dtype", "bfloat16", "--mlp", "--out", out)
    prefix, meta = load_prefix(out)
    assert prefix.table().dtype == torch.float32 and meta["info"]["dtype"] == "bfloat16"
    p = run("sample.py", "--prefix", out, "--dtype", "bfloat16", "--n", 2, "--max-new-tokens", 10)
    assert len(samples(p)) == 2


def test_sentiment_eval_refuses_labels_its_judge_does_not_know(offline_model, tmp_path):
    from minprefix.prefix import KVPrefix, save_prefix
    path = tmp_path / "other.safetensors"
    save_prefix(path, KVPrefix(offline_model.config, 2, 3), offline_model.name_or_path, ["good", "bad"])
    p = run("eval.py", "--prefix", path, "--out", tmp_path / "eval", check=False)
    assert p.returncode == 2 and "labels good, bad" in p.stderr and "only positive and negative" in p.stderr
