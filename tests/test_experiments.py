"""The studies' bookkeeping (experiments/): a finished run made with the same settings is read back, not rerun,
one made with other settings is refused naming what differs, and --report writes the table from what has
finished, each cell saying how many runs it holds. The runs themselves are train.py's and eval.py's
code, tested in their own files."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import common  # noqa: E402
import low_data  # noqa: E402


def test_fmt_gives_mean_spread_and_the_count_where_runs_are_missing():
    assert common.fmt([1.0, 3.0]) == "2.0 ± 1.4 [1.0-3.0]"
    assert common.fmt([1.0, 3.0], expected=3) == "2.0 ± 1.4 [1.0-3.0] (n=2)"
    assert common.fmt([5.0], expected=1) == "5.0 ± 0.0 [5.0-5.0]"
    assert common.fmt([], expected=3) == "-"


def finished(folder, bleu, made_with=None):
    os.makedirs(folder)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"scores": {"bleu": bleu, "rouge_l": 2 * bleu, "nist": 1.0, "cider": 0.1}, "val_loss": 3.0,
                   "made_with": made_with}, f)


@pytest.fixture
def study(tmp_path, monkeypatch, offline_model_dir):
    """A study run's data (two small files) and args; train.py and eval.py fail if called: a result that is read
    back runs nothing."""
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text('{"source": "name : X", "text": "X is here."}\n')
    monkeypatch.setenv("MINPREFIX_MODEL", str(offline_model_dir))
    monkeypatch.setattr(common, "DATA", str(tmp_path / "e2e-data"))  # the test tables' file: not written here
    for script in (common.train_script, common.eval_script):
        monkeypatch.setattr(script, "main", lambda argv: pytest.fail(f"ran {argv}"))
    args = ["--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "dev.jsonl"), "--mode", "lora",
            "--max-steps", "200", "--lr", "2e-4"]
    return tmp_path, args


def test_a_finished_run_made_with_the_same_settings_is_read_back(study):
    tmp_path, args = study
    finished(tmp_path / "run", 7.0, common.made_with(args))
    assert common.run(str(tmp_path / "run"), args)["scores"]["bleu"] == 7.0  # train.py never called
    assert common.run(str(tmp_path / "run"), args, report=True)["scores"]["bleu"] == 7.0
    assert common.run(str(tmp_path / "other"), args, report=True) is None
    assert not (tmp_path / "other").exists()


def other_model(tmp_path, offline_model_dir):
    """The offline model's config with other weights: another base model."""
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "config.json").write_bytes((offline_model_dir / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(b"other weights")
    return folder


@pytest.mark.parametrize("change", ["base model", "steps", "data", "dtype", "not recorded"])
def test_a_result_made_with_other_settings_is_refused_naming_what_differs(study, monkeypatch, capsys,
                                                                          offline_model_dir, change):
    """Issue 30: a cached stand-in result came back for another base model and twice the steps. Each thing that
    makes a run, changed: the run is refused (nothing trained, the result left as it is) with the difference
    named; --report leaves it out of the table, saying why."""
    tmp_path, args = study
    folder = tmp_path / "100-0-LoRA"
    finished(folder, 7.0, None if change == "not recorded" else common.made_with(args))
    before = (folder / "result.json").read_text()
    dtype, named = "float32", {"base model": "base_model", "steps": "--max-steps", "data": "--data",
                               "dtype": "dtype", "not recorded": "not recorded"}[change]
    if change == "base model":
        monkeypatch.setenv("MINPREFIX_MODEL", str(other_model(tmp_path, offline_model_dir)))
    elif change == "steps":
        args = [a if a != "200" else "400" for a in args]
    elif change == "data":
        (tmp_path / "train.jsonl").write_text('{"source": "name : Y", "text": "Y is here."}\n')
    elif change == "dtype":
        dtype = "bfloat16"
    with pytest.raises(SystemExit) as e:
        common.run(str(folder), args, dtype=dtype)
    assert named in str(e.value) and str(folder) in str(e.value) and "--out" in str(e.value), str(e.value)
    assert (folder / "result.json").read_text() == before
    assert common.run(str(folder), args, dtype=dtype, report=True) is None
    assert named in capsys.readouterr().err


def test_the_length_study_names_each_run_with_its_learning_rate(monkeypatch):
    """budget.py's length study takes the MLP prefix's rate from the rate study's best: a run made at another
    rate is another run, in another folder (issue 30: the folder named no rate, and the old result came back)."""
    import budget
    folders = []
    monkeypatch.setattr(budget, "one", lambda folder, flags, report=False: folders.append((folder, flags)))
    monkeypatch.setattr(budget, "best_prefix_lr", lambda out, report=False: "3e-4")
    budget.length_study("out")
    for folder, flags in folders:
        rate = flags[flags.index("--lr") + 1]
        assert os.path.basename(folder).endswith(f"-lr{rate}"), (folder, rate)
    assert {flags[flags.index("--lr") + 1] for _, flags in folders} == {"3e-4", "5e-3"}


def test_low_data_report_tables_what_finished_and_trains_nothing(tmp_path, monkeypatch):
    for module in (common, low_data):  # where the data would be: nothing is written there
        monkeypatch.setattr(module, "DATA", str(tmp_path / "e2e-data"))
    made = lambda method, size, sub: common.made_with(*low_data.run_args(method, size, sub, write=False), write=False)
    finished(tmp_path / "50-0-prefix", 4.0, made("prefix", 50, 0))
    finished(tmp_path / "50-1-prefix", 6.0, made("prefix", 50, 1))
    finished(tmp_path / "50-0-fine-tuning", 10.0, made("fine-tuning", 50, 0))
    finished(tmp_path / "50-2-prefix", 99.0, dict(made("prefix", 50, 2), dtype="bfloat16"))  # made otherwise: left out
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(sys, "argv", ["low_data.py", "--report", "--out", str(tmp_path), "--sizes", "50", "100",
                                      "--subsamples", "3"])
    low_data.main()
    table = (tmp_path / "low_data.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "5.0 ± 1.4 [4.0-6.0] (n=2)" in rows["50"] and "10.0 ± 0.0 [10.0-10.0] (n=1)" in rows["50"]
    assert rows["100"].count(" - ") + rows["100"].endswith(" - |") >= 5  # nothing at 100: every cell empty
    assert "50: -5.0" in table  # prefix minus fine-tuning where both have runs
    assert (tmp_path / "low_data.png").exists() and not (tmp_path / "e2e-data").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p[0].isdigit()) == [p for p in before if p[0].isdigit()]


@pytest.mark.parametrize("study", ["lr", "length"])
def test_budget_report_with_nothing_finished_writes_empty_tables(tmp_path, monkeypatch, study):
    import budget
    monkeypatch.setattr(sys, "argv", ["budget.py", "--study", study, "--report", "--out", str(tmp_path)])
    budget.main()
    assert (tmp_path / f"{study}.md").exists() and not (tmp_path / "lr" / "LoRA-1e-3").exists()


def test_dial_reuses_an_evaluation_only_for_the_same_checkpoints_model_and_settings(tmp_path, monkeypatch,
                                                                                    offline_model_dir):
    """dial.py compared only the list of checkpoint paths (issue 30): a changed --sweep-samples, or a checkpoint
    retrained at the same path, brought the old evaluation back. Now each of those evaluates again."""
    import dial
    from minprefix.gpt2 import GPTConfig
    from minprefix.prefix import KVPrefix, save_prefix
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256)  # the offline model's shape (a prefix's checkpoint says it)
    ckpts = []
    for name in ("a", "b"):
        ckpts.append(str(tmp_path / f"{name}.safetensors"))
        save_prefix(ckpts[-1], KVPrefix(config, 2, 2), str(offline_model_dir), ["positive", "negative"])
    ran = []

    def fake_eval(argv):
        ran.append(argv)
        folder = argv[argv.index("--out") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump({"rows": len(ran)}, f)
    monkeypatch.setattr(dial.evaluate_script, "main", fake_eval)
    folder = str(tmp_path / "eval")
    args = ["--data", os.path.join(REPO, "data", "test.jsonl"), "--sweep-samples", "24"]
    assert dial.evaluation(folder, ckpts, args, "x") == {"rows": 1}
    assert dial.evaluation(folder, ckpts, args, "x") == {"rows": 1} and len(ran) == 1  # the same: read back
    args[-1] = "8"
    assert dial.evaluation(folder, ckpts, args, "x") == {"rows": 2}  # another sweep
    import torch
    prefix = KVPrefix(config, 2, 2)
    with torch.no_grad():
        prefix.table_.fill_(1.0)
    save_prefix(ckpts[1], prefix, str(offline_model_dir), ["positive", "negative"])  # retrained in place
    assert dial.evaluation(folder, ckpts, args, "x") == {"rows": 3}
    assert dial.evaluation(folder, ckpts[:1], args, "x") == {"rows": 4}  # fewer checkpoints
    assert dial.evaluation(folder, ckpts[:1], args, "x") == {"rows": 4} and len(ran) == 4


def test_long_study_reads_each_stretch_and_the_issues_bar():
    """experiments/long.py: a stretch's share is judged in alpha's direction (VADER's thresholds, +-0.05), and the
    verdict lines read the last stretch against the first, and a schedule's stretches for monotony within intervals."""
    import argparse
    import long as study
    s = study.summarise([[0.9, 0.5, -0.2, 0.01], [0.1, -0.6, -0.9, -0.3]], alpha=1.0)
    assert [x["share"] for x in s] == [0.5, 0.25] and s[0]["mean"] == pytest.approx(0.3025)
    assert [x["share"] for x in study.summarise([[0.9, -0.5, -0.2, 0.01]], alpha=0.0)] == [0.5]
    assert study.summarise([[0.9, -0.5]], alpha=0.5)[0]["share"] is None  # no direction asked for
    args = argparse.Namespace(boosts=[0.0, 2.0], guidance=[], guide_from="bare", frequency_penalty=0.0)
    up = study.summarise([[-0.9, -0.8, -0.7], [0.0, 0.1, -0.1], [0.8, 0.9, 0.7]], alpha=0.0)
    results = {"conditions": {
        "alpha 1": {"summary": study.summarise([[0.9] * 10, [0.9] * 7 + [-0.9] * 3], 1.0)},
        "alpha 0, boost 2": {"summary": study.summarise([[-0.9] * 10, [-0.9] * 9 + [0.9]], 0.0)},
        "schedule 0:0,500:1, boost 2": {"summary": up}}}
    lines = study.verdicts(results, args)
    assert "alpha 1: last stretch positive in 70% of samples (first 100%, +30 points lost): misses" in lines[0]
    assert "alpha 0, boost 2: last stretch negative in 90% of samples (first 100%, +10 points lost): meets" in lines[1]
    assert "monotone within the intervals" in lines[2] and "not monotone" not in lines[2]
    results["conditions"]["schedule 0:0,500:1, boost 2"]["summary"] = up[::-1]
    assert "not monotone" in study.verdicts(results, args)[2]
    # guidance's anchor is in the condition's name and its verdict (the bare model's is the default, unnamed)
    assert study.name("alpha 0", 2.0, 1.0, "mix") == "alpha 0, boost 2, guidance 1 from mix"
    assert study.name("alpha 0", 2.0, 1.0) == "alpha 0, boost 2, guidance 1" == study.name("alpha 0", 2.0, 1.0, "bare")
    assert study.name("alpha 0", 2.0, 0.0, "mix") == "alpha 0, boost 2"  # no guidance: no anchor
    results["conditions"]["alpha 0, boost 2, guidance 1 from mix"] = results["conditions"]["alpha 0, boost 2"]
    results["conditions"]["alpha 0.5"] = {"summary": study.summarise([[0.1] * 10], 0.5)}  # no direction: no verdict
    lines = study.verdicts(results, args)  # every finished condition of alpha 0 or 1, whatever this run's flags
    assert lines[2].startswith("- alpha 0, boost 2, guidance 1 from mix: last stretch negative in 90%")
    assert len(lines) == 4 and lines[3].startswith("- schedule") and not any("alpha 0.5" in x for x in lines)
