"""train.py -> sample.py -> eval.py end to end on the offline model, and their errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import torch

from conftest import REPO, SHARED, assert_near
from conftest import run_script as run  # a script in a subprocess
from minprefix.guidance import DEFAULT_STRENGTH
from minprefix.prefix import load_prefix

pytestmark = pytest.mark.slow  # the scripts run end to end in subprocesses: python -m pytest -m "not slow" leaves them out


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
    assert p.returncode == 2 and "this checkpoint knows positive, negative" in p.stderr


def test_eval_writes_table_json_and_plot(trained, small_data, tmp_path):
    p = run("eval.py", "--prefix", trained[0], "--data", small_data / "test.jsonl", "--n-samples", 1,
            "--sweep-samples", 1, "--max-new-tokens", 8, "--out", tmp_path)
    named = "K/V prefix + MLP, P=10" + (f", guidance {DEFAULT_STRENGTH:g}" if DEFAULT_STRENGTH else "")  # the default
    assert "| base model, no prefix |" in p.stdout and f"| {named} |" in p.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in result["rows"]][:2] == ["base model, no prefix", named]
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


def ctrl_c_on():
    """In the child, before train.py starts: SIGINT back to its default. A shell ignores SIGINT in the jobs it runs
    in the background (`pytest &`), the child inherits that, and Python then installs no KeyboardInterrupt: the
    test's Ctrl-C would go unheard. A user pressing Ctrl-C runs train.py in the foreground, where it is on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_until(args, line_starts, cwd=REPO):
    """Start train.py, wait for a line of its output that starts with line_starts, then press Ctrl-C."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=ctrl_c_on)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_starts):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + stdout, stderr


def test_ctrl_c_keeps_a_usable_checkpoint(offline_model_dir, offline_model, tmp_path):
    out = tmp_path / "prefix.safetensors"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model", str(offline_model_dir), "--mlp",
                             "--epochs", "50", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=ctrl_c_on)
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
    assert not (tmp_path / "whole.resume.pt").exists()  # a finished run leaves no resume state behind
    out = tmp_path / "resumed.safetensors"
    code, stdout, _ = train_until([*common, "--out", out], "epoch 1:")
    assert code == 130 and "--resume continues after epoch 1" in stdout
    assert f"{out} holds epoch 1, as written when it finished" in stdout and "saved" not in stdout.split("--resume")[-1]
    # another learning rate and other data, both named at once: refused
    other = tmp_path / "other.jsonl"
    other.write_text((small_data / "train.jsonl").read_text().replace("great", "fine"))
    changed = [c if c != "1e-3" else "2e-3" for c in common]
    changed[3] = other
    p = run("train.py", *changed, "--out", out, "--resume", check=False)
    assert p.returncode == 2 and "lr = 0.001, this one asks for 0.002" in p.stderr and "a run with data = " in p.stderr
    p = run("train.py", *common, "--out", out, "--resume")
    assert "resuming after epoch 1 of 3" in p.stdout + p.stderr and "kept epoch 3" in p.stdout
    a, _ = load_prefix(tmp_path / "whole.safetensors")
    b, meta = load_prefix(out)
    # the same steps in two processes: AdamW's float32 updates, bit for bit but for kernels' summation order
    assert_near(b.table(), a.table(), 1e-6, "resumed against uninterrupted")
    assert meta["info"]["epoch"] == 3
    p = run("train.py", *common, "--out", out, "--resume")  # finished: its state is gone, and nothing is left to do
    assert "finished all its 3 epochs: nothing left to do" in p.stdout and "--keep-resume-state" in p.stdout


def test_resume_extends_a_run_and_says_when_nothing_is_left(offline_model_dir, small_data, tmp_path):
    common = ["--model", offline_model_dir, "--data", small_data / "train.jsonl", "--val-data",
              small_data / "test.jsonl", "--lr", "1e-3", "--out", tmp_path / "p.safetensors", "--keep-resume-state"]
    run("train.py", *common, "--epochs", 1)
    p = run("train.py", *common, "--epochs", 1, "--resume")
    assert p.returncode == 0 and "finished 1 epochs of 1: nothing left to do" in p.stdout
    p = run("train.py", *common, "--epochs", 2, "--resume")
    assert "extending the run from 1 to 2 epochs" in p.stdout + p.stderr and "epoch 2:" in p.stdout


def test_trained_checkpoint_loads_from_another_folder(trained, tmp_path):
    """The base model's folder is recorded as an absolute path: sample.py runs from anywhere."""
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prefix", str(trained[0]), "--n", "1",
                        "--max-new-tokens", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_prompts_file_batched_equals_each_prompt_alone(trained, tmp_path):
    prompts = ["The food", "I went to the labs because the mentors", "A", "Our mentor said that"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    p = run("sample.py", "--prefix", trained[0], "--prompts-file", tmp_path / "prompts.txt", "--temperature", 0,
            "--max-new-tokens", 25, "--alpha", 0.8, "--output", tmp_path / "out.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["alpha"] == 0.8 for r in rows)
    assert [(r["index"], r["prompt_index"], r["line"]) for r in rows] == [(i, i, i + 1) for i in range(4)]
    for prompt, row in zip(prompts, rows):
        run("sample.py", "--prefix", trained[0], "--prompt", prompt, "--n", 1, "--temperature", 0,
                    "--max-new-tokens", 25, "--alpha", 0.8, "--output", tmp_path / "one.jsonl")
        assert json.loads((tmp_path / "one.jsonl").read_text())["text"] == row["text"]
    assert samples(p) == [f"[{i + 1}] {q}{r['text']}" for i, (q, r) in enumerate(zip(prompts, rows))]  # in order
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prefix", str(trained[0]), "--prompts-file", "-",
                        "--temperature", "0", "--max-new-tokens", "25", "--alpha", "0.8"], input="\n".join(prompts),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert samples(p) == [f"[{i + 1}] {q}{r['text']}" for i, (q, r) in enumerate(zip(prompts, rows))]  # stdin


def test_prompts_file_blank_lines_are_skipped_and_said(trained, tmp_path):
    (tmp_path / "prompts.txt").write_text("The food\n\nThe labs\n   \nOur mentor\n\n")
    p = run("sample.py", "--prefix", trained[0], "--prompts-file", tmp_path / "prompts.txt", "--temperature", 0,
            "--max-new-tokens", 5, "--output", tmp_path / "out.jsonl")
    assert "skipped blank lines 2, 4" in p.stderr
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["line"]) for r in rows] == [("The food", 1), ("The labs", 3), ("Our mentor", 5)]


def test_stream_with_many_rows_prints_and_writes_every_sample(trained, tmp_path):
    """--stream with --n 3, and with a two-prompt file: every sample printed once, with its own number and prompt,
    and written to --output; each the text the same seed gives that row decoded alone."""
    out = tmp_path / "s.jsonl"
    p = run("sample.py", "--prefix", trained[0], "--stream", "--n", 3, "--max-new-tokens", 12, "--prompt", "The labs",
            "--output", out)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2] and all(r["text"] is not None for r in rows)
    assert samples(p) == [f"[{i + 1}] The labs{r['text']}" for i, r in enumerate(rows)]
    assert len({r["text"] for r in rows}) > 1  # three samples, not one row printed three times
    (tmp_path / "two.txt").write_text("The food\nOur mentor\n")
    p = run("sample.py", "--prefix", trained[0], "--stream", "--prompts-file", tmp_path / "two.txt",
            "--max-new-tokens", 12, "--temperature", 0, "--output", out)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The food", "Our mentor"] and all(r["text"] is not None for r in rows)
    assert samples(p) == ["[1] The food" + rows[0]["text"], "[2] Our mentor" + rows[1]["text"]]
    for r in rows:  # greedy: the same text as the prompt decoded alone, without streaming
        run("sample.py", "--prefix", trained[0], "--prompt", r["prompt"], "--n", 1, "--temperature", 0,
                    "--max-new-tokens", 12, "--no-stream", "--output", tmp_path / "one.jsonl")
        assert json.loads((tmp_path / "one.jsonl").read_text())["text"] == r["text"]


def test_beam_search_honours_or_refuses_each_flag(trained, tmp_path):
    for flag, value in (("--temperature", "0.7"), ("--seed", "3"), ("--top-p", "0.5"), ("--top-k", "5"),
                        ("--stream", None)):
        p = run("sample.py", "--prefix", trained[0], "--num-beams", 3, flag, *([value] if value else []), check=False)
        assert p.returncode == 2 and f"{flag} does not apply to beam search" in p.stderr, (flag, p.stderr[-300:])
    p = run("sample.py", "--prefix", trained[0], "--num-beams", 3, "--n", 3, "--max-new-tokens", 8,
            "--prompt", "The labs", "--output", tmp_path / "b.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2] and len({r["text"] for r in rows}) == 3  # the 3 best hypotheses
    p = run("sample.py", "--prefix", trained[0], "--num-beams", 3, "--n", 4, check=False)
    assert p.returncode == 2 and "at most that many" in p.stderr


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
    scores = result["scores"]  # real numbers in their ranges, never NaN
    assert 0 <= scores["bleu"] <= 100 and 0 <= scores["rouge_l"] <= 100 and 0 <= scores["cider"] <= 10
    assert scores["nist"] is None or 0 <= scores["nist"] <= 15
    # one line per table, whatever an output holds: min_new_tokens=5 holds <|endoftext|> back for 5 tokens, but
    # spaces are tokens too and strip to nothing, so an output may be blank (the low-data study counts those)
    assert (tmp_path / "eval/e2e_outputs.txt").read_text().count("\n") == 3
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
            ("eval.py", ["--prefix", trained[0], "--task", "e2e"], "was trained on labelled text")):
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
    assert len(samples(p)) == 2 and all(len(s.split()) > 3 for s in samples(p))
    # the bfloat16 run's prefix works like one: in bfloat16 and in float32 the model under it picks the same next
    # token at nearly every position of the held-out texts, and the prefix changes what the model predicts
    from minprefix import GPT2, Tokenizer
    from minprefix.data import batches, encode, read_jsonl
    tok = Tokenizer()
    items = encode(read_jsonl(small_data / "test.jsonl"), tok, ["positive", "negative"], 1000)
    (idx, targets, y), = batches(items, len(items))
    agree = []
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            model = GPT2.from_pretrained(offline_model_dir, dtype=dtype)
            _, cache = prefix.apply(model, torch.nn.functional.one_hot(y, 2).float())
            agree.append(model(idx, cache).float().argmax(-1)[targets != -100])
            plain = model(idx).float().argmax(-1)[targets != -100]
    assert (agree[0] == agree[1]).float().mean() > 0.95
    assert (agree[1] != plain).any()


def test_sentiment_eval_refuses_labels_its_judge_does_not_know(offline_model, tmp_path):
    from minprefix.prefix import KVPrefix, save_prefix
    path = tmp_path / "other.safetensors"
    save_prefix(path, KVPrefix(offline_model.config, 2, 3), offline_model.name_or_path, ["good", "bad"])
    p = run("eval.py", "--prefix", path, "--out", tmp_path / "eval", check=False)
    assert p.returncode == 2 and "labels good, bad" in p.stderr and "only positive and negative" in p.stderr


# ---- messages that name what is wrong (issue 15) ----

def test_tone_flags_name_what_is_wrong(offline_model, tmp_path):
    """A 3-label checkpoint with no tone flag asks for --sentiment or --weights (and blames no flag it was not
    given); a 1-label checkpoint refuses --alpha instead of ignoring it; --weights of the wrong count is named."""
    from minprefix.prefix import KVPrefix, save_prefix
    three, one = tmp_path / "three.safetensors", tmp_path / "one.safetensors"
    save_prefix(three, KVPrefix(offline_model.config, 3, 2), offline_model.name_or_path, ["a", "b", "c"])
    save_prefix(one, KVPrefix(offline_model.config, 1, 2), offline_model.name_or_path, ["task"])
    p = run("sample.py", "--prefix", three, "--n", 1, "--max-new-tokens", 3, check=False)
    assert p.returncode == 2 and "has 3 labels (a, b, c): choose one with --sentiment, or a mix with --weights" in p.stderr
    assert "--weights:" not in p.stderr
    p = run("sample.py", "--prefix", three, "--weights", "0.5,0.5", check=False)
    assert p.returncode == 2 and "--weights '0.5,0.5': 2 weights for 3 labels: give one per label, in the checkpoint's order (a, b, c)" in p.stderr
    p = run("sample.py", "--prefix", one, "--alpha", "0.2", check=False)
    assert p.returncode == 2 and "--alpha weighs the label called positive" in p.stderr
    assert "it has nothing to mix" in p.stderr
    run("sample.py", "--prefix", three, "--weights", "0.2,0.3,0.5", "--n", 1, "--max-new-tokens", 3)


def test_a_long_prefix_on_a_short_context_is_named_for_labelled_text(tmp_path, small_data):
    from conftest import random_hf_gpt2, write_hub_layout
    folder = write_hub_layout(random_hf_gpt2(n_layer=2, n_embd=32, n_head=2, n_positions=64), tmp_path / "tiny")
    p = run("train.py", "--model", folder, "--data", small_data / "train.jsonl", "--val-data",
            small_data / "test.jsonl", "--prefix-len", 62, "--out", tmp_path / "x.safetensors", check=False)
    error = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "--prefix-len 62 leaves 2 of the model's 64 positions" in error
    assert "source" not in error


def test_e2e_names_a_base_model_as_such_and_writes_strict_json(offline_model_dir, tmp_path, monkeypatch):
    """--model FOLDER that train.py did not fine-tune is 'base model ..., as it is'; a NIST the official scorer
    cannot compute (no 5-gram in any output) is null in eval.json, which strict JSON parsers read."""
    p = run("eval.py", "--task", "e2e", "--model", offline_model_dir, "--limit", 2, "--max-new-tokens", 2,
            "--out", tmp_path / "eval")
    text = (tmp_path / "eval/eval.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"eval.json holds {c}"))
    assert "fine-tuned from" not in p.stdout and "as it is" in result["settings"]["system"]
    assert result["scores"]["nist"] is None and "NIST: -" in p.stdout  # two-token outputs: no 5-gram
    assert all(math.isfinite(result["scores"][k]) for k in ("bleu", "rouge_l", "cider"))


def test_sentiment_eval_honours_limit_and_no_base_and_shows_progress(trained, small_data, tmp_path):
    p = run("eval.py", "--prefix", trained[0], "--data", small_data / "test.jsonl", "--limit", 3, "--no-base",
            "--n-samples", 1, "--sweep-samples", 1, "--max-new-tokens", 4, "--out", tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert "base model, no prefix" not in names and names[0] == "K/V prefix + MLP, P=10" + (
        f", guidance {DEFAULT_STRENGTH:g}" if DEFAULT_STRENGTH else "")
    assert result["rows"][0]["n_generations"] == 3 and result["rows"][-1]["n_generations"] == 3
    assert "continuations" in p.stderr and "100%" in p.stderr  # the progress bar ran to its end
    sweep = result["rows"][0]
    assert set(sweep["alpha_sweep_ci"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"} and "dial_slope" in sweep


def test_loss_plot_has_integer_steps_and_the_kept_point_visible(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    from minprefix.trainer import save_loss_plot
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    save_loss_plot({"step_loss": [5.0, 4.0, 3.5], "val": [{"loss": 4.2, "steer_margin": 0.1, "steer_acc": 0.6}],
                    "val_loss": [4.2], "steps_per_epoch": 3, "kept_epoch": 1, "selected_by": "steer_margin"},
                   tmp_path / "p.png")
    ax = figures[0].axes[0]
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 3.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    star = [l for l in ax.get_lines() if l.get_marker() == "*"][0]
    assert star.get_markerfacecolor() == "none"  # hollow: the held-out point inside it stays visible
    assert len(figures[0].axes) == 2  # the steering margin on its own axis


# ---- issue 30: alpha by label name ----

def negative_first(trained, tmp_path):
    """The trained checkpoint stored with its labels the other way round (as `python -m minprefix.peft import NEG
    POS --labels negative,positive` stores one): the same prefixes, negative's first."""
    from minprefix.prefix import KVPrefix, save_prefix
    prefix, meta = load_prefix(trained[0])
    flipped = KVPrefix(prefix.config, 2, prefix.prefix_len)
    with torch.no_grad():
        flipped.table_.copy_(prefix.table_.flip(0))
    path = tmp_path / "negative-first.safetensors"
    save_prefix(path, flipped, meta["base_model"], ["negative", "positive"], meta["info"])
    return path


def test_alpha_weighs_the_positive_label_whatever_the_checkpoints_order(trained, tmp_path):
    """--alpha 1.0 is the label called positive on a checkpoint stored negative-first too: the same text as the
    positive-first checkpoint writes; the mix sample.py prints names each weight's label."""
    path = negative_first(trained, tmp_path)
    got = {}
    for ckpt, alpha in ((trained[0], "1.0"), (path, "1.0"), (path, "0.3")):
        p = run("sample.py", "--prefix", ckpt, "--alpha", alpha, "--n", 2, "--max-new-tokens", 12, "--seed", 1)
        got[ckpt, alpha] = samples(p)
    assert got[path, "1.0"] == got[trained[0], "1.0"]  # the positive prefix alone, exactly, from either order
    assert got[path, "0.3"] != got[path, "1.0"] and "0.7*negative, 0.3*positive" in p.stdout


def test_alpha_is_refused_where_no_label_is_called_positive(offline_model, tmp_path):
    from minprefix.prefix import KVPrefix, save_prefix
    path = tmp_path / "other.safetensors"
    save_prefix(path, KVPrefix(offline_model.config, 2, 3), offline_model.name_or_path, ["good", "bad"])
    p = run("sample.py", "--prefix", path, "--alpha", "0.3", check=False)
    assert p.returncode == 2 and "--alpha weighs the label called positive" in p.stderr
    assert "--weights" in p.stderr and "good, bad" in p.stderr
    p = run("sample.py", "--prefix", path, "--n", 1, "--max-new-tokens", 2)  # no flag: an even mix, said so
    assert "0.5*good, 0.5*bad" in p.stdout


# ---- issue 30: a new run never silently replaces a finished one; what train.py says of its run ----

def test_a_finished_checkpoint_is_kept_from_a_new_run(offline_model_dir, small_data, tmp_path):
    """The same command twice: the second is refused up front, naming the finished run at --out and the ways on;
    --resume says there is nothing left to do (exit 0); --overwrite moves the old run aside before its first
    write, so that Ctrl-C in the new run leaves the finished checkpoint, its history and loss plot as they were."""
    out = tmp_path / "prefix.safetensors"
    command = ["--model", offline_model_dir, "--data", small_data / "train.jsonl", "--val-data",
               small_data / "test.jsonl", "--limit", 8, "--epochs", 1, "--out", out]
    run("train.py", *command)
    files = {name: (tmp_path / name).read_bytes() for name in ("prefix.safetensors", "prefix.history.json",
                                                               "prefix.loss.png")}
    p = run("train.py", *command, check=False)
    assert p.returncode == 2 and f"--out {out} holds a finished run" in p.stderr, p.stderr
    assert "--resume" in p.stderr and "--overwrite" in p.stderr and "epoch 1:" not in p.stdout
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    p = run("train.py", *command, "--resume")
    assert "finished all its 1 epochs: nothing left to do" in p.stdout
    code, stdout, stderr = train_until([*command[:-4], "--epochs", 50, "--out", out, "--overwrite"], "epoch 1:")
    assert code == 130, stderr
    assert f"moved the previous run's files aside: {tmp_path / 'prefix.previous.safetensors'}" in stdout
    assert {name: (tmp_path / name.replace("prefix.", "prefix.previous.", 1)).read_bytes() for name in files} == files
    assert load_prefix(out)[1]["info"]["epochs"] == 50  # the new run's, interrupted, where it was asked to write


def test_max_steps_sets_the_epochs_reported_and_stored_and_a_short_run_warns_of_its_warm_up(offline_model_dir,
                                                                                            small_data, tmp_path):
    """8 examples in batches of 2 are 4 steps an epoch: --max-steps 6 is 2 epochs, whatever --epochs says (issue
    30: the log said 10 epochs, the checkpoint too); a warm-up longer than the run never reaches the peak rate."""
    out = tmp_path / "p.safetensors"
    p = run("train.py", "--model", offline_model_dir, "--data", small_data / "train.jsonl", "--val-data",
            small_data / "test.jsonl", "--limit", 8, "--val-limit", 2, "--epochs", 10, "--max-steps", 6, "--warmup",
            10, "--keep", "last", "--out", out)
    assert "batch 2, 2 epochs (6 steps)" in p.stdout and "10 epochs" not in p.stdout
    assert "--warmup 10 does not end within the run's 6 steps" in p.stderr
    info = load_prefix(out)[1]["info"]
    assert info["epochs"] == 2 and info["epoch"] == 2 and info["steps"] == 6


def test_batch_size_given_with_an_equals_sign_is_honoured_and_reference_recipe_refused_on_tables(
        offline_model_dir, tmp_path):
    """E2E LoRA's default batch is 8, but --batch-size=10 is a batch of 10, as --batch-size 10 is (issue 30: only
    the spaced form was seen); --recipe reference is labelled text's: refused on source -> text data."""
    data = tmp_path / "tables.txt"
    data.write_text("".join(f"name : Pub{i} | Type : pub||Pub{i} is a pub .\n" for i in range(4)))
    common = ["--model", offline_model_dir, "--data", data, "--val-data", data, "--mode", "lora", "--max-steps", 1,
              "--warmup", 0]
    for i, form in enumerate((["--batch-size=10"], ["--batch-size", "10"])):
        p = run("train.py", *common, *form, "--out", tmp_path / f"{i}.safetensors")
        assert "batch 10," in p.stdout, form
    p = run("train.py", *common, "--out", tmp_path / "d.safetensors")
    assert "batch 8," in p.stdout  # the LoRA paper's E2E batch, the default
    p = run("train.py", *common, "--recipe", "reference", "--out", tmp_path / "r.safetensors", check=False)
    assert p.returncode == 2 and "--recipe reference" in p.stderr and "source -> text" in p.stderr
