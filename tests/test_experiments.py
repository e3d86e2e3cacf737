"""The studies' bookkeeping (experiments/): a finished run is read back, not rerun, and --report writes the table
from what has finished, each cell saying how many runs it holds. The runs themselves are train.py's and eval.py's
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


def finished(folder, bleu):
    os.makedirs(folder)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"scores": {"bleu": bleu, "rouge_l": 2 * bleu, "nist": 1.0, "cider": 0.1}, "val_loss": 3.0}, f)


def test_a_finished_run_is_read_back_not_run_again(tmp_path):
    finished(tmp_path / "run", 7.0)
    assert common.run(str(tmp_path / "run"), ["--no-such-flag"])["scores"]["bleu"] == 7.0  # train.py never called
    assert common.run(str(tmp_path / "other"), ["--no-such-flag"], report=True) is None
    assert not (tmp_path / "other").exists()


def test_low_data_report_tables_what_finished_and_trains_nothing(tmp_path, monkeypatch):
    finished(tmp_path / "50-0-prefix", 4.0)
    finished(tmp_path / "50-1-prefix", 6.0)
    finished(tmp_path / "50-0-fine-tuning", 10.0)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(sys, "argv", ["low_data.py", "--report", "--out", str(tmp_path), "--sizes", "50", "100",
                                      "--subsamples", "3"])
    low_data.main()
    table = (tmp_path / "low_data.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "5.0 ± 1.4 [4.0-6.0] (n=2)" in rows["50"] and "10.0 ± 0.0 [10.0-10.0] (n=1)" in rows["50"]
    assert rows["100"].count(" - ") + rows["100"].endswith(" - |") >= 5  # nothing at 100: every cell empty
    assert "50: -5.0" in table  # prefix minus fine-tuning where both have runs
    assert (tmp_path / "low_data.png").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p[0].isdigit()) == [p for p in before if p[0].isdigit()]


@pytest.mark.parametrize("study", ["lr", "length"])
def test_budget_report_with_nothing_finished_writes_empty_tables(tmp_path, monkeypatch, study):
    import budget
    monkeypatch.setattr(sys, "argv", ["budget.py", "--study", study, "--report", "--out", str(tmp_path)])
    budget.main()
    assert (tmp_path / f"{study}.md").exists() and not (tmp_path / "lr" / "LoRA-1e-3").exists()


def test_long_study_reads_each_stretch_and_the_issues_bar():
    """experiments/long.py: a stretch's share is judged in alpha's direction (VADER's thresholds, +-0.05), and the
    verdict lines read the last stretch against the first, and a schedule's stretches for monotony within intervals."""
    import argparse
    import long as study
    s = study.summarise([[0.9, 0.5, -0.2, 0.01], [0.1, -0.6, -0.9, -0.3]], alpha=1.0)
    assert [x["share"] for x in s] == [0.5, 0.25] and s[0]["mean"] == pytest.approx(0.3025)
    assert [x["share"] for x in study.summarise([[0.9, -0.5, -0.2, 0.01]], alpha=0.0)] == [0.5]
    assert study.summarise([[0.9, -0.5]], alpha=0.5)[0]["share"] is None  # no direction asked for
    args = argparse.Namespace(boosts=[0.0, 2.0], guidance=[])
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
