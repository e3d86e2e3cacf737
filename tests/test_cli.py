"""train.py -> sample.py -> eval.py end to end on the offline model, and their errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
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


@pytest.mark.parametrize("alpha", ["1.0", "0.0", "0.5"])
def test_sample_with_alpha(trained, alpha):
    p = run("sample.py", "--prefix", trained[0], "--alpha", alpha, "--n", 2, "--max-new-tokens", 12, "--seed", 1)
    lines = [l for l in p.stdout.splitlines() if l.startswith("[")]
    assert len(lines) == 2 and f"{float(alpha):g}*positive" in p.stdout


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
    assert [r["name"] for r in result["rows"]] == ["base model, no prefix", "K/V prefix + MLP, P=10",
                                                   "held-out texts themselves (the judge's ceiling)"]
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
    assert p.returncode != 0 and f"{bad}:2: missing field 'sentiment'" in p.stderr


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
