"""The .env file (minprefix/env.py): read once by every script, never over a variable the environment already has."""
import os
import runpy
import sys
from pathlib import Path

import pytest

from minprefix import env

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "sample.py", "eval.py", "experiments/dial.py", "experiments/budget.py",
           "experiments/low_data.py", "experiments/init.py", "bench/bench_dtype.py", "bench/bench_vs_peft.py",
           "bench/profile_steps.py"]
KEY = "MINPREFIX_ENV_TEST"  # a variable no one sets


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setenv(KEY, "")
    monkeypatch.delenv(KEY)  # absent now, and absent again after the test, whatever load_env set


def test_lines_comments_quotes_and_relative_paths(tmp_path):
    (tmp_path / ".env").write_text("# a comment\n\nA=1\nexport B = two words \nC=\"quoted # not a comment\"\n"
                                   "D=../shared/tiktoken\nE=./x\nF=gpt2-medium\nG=\n")
    got = env.read_env(tmp_path / ".env")
    assert got == {"A": "1", "B": "two words", "C": "quoted # not a comment",
                   "D": str(tmp_path.parent / "shared" / "tiktoken"), "E": str(tmp_path / "x"), "F": "gpt2-medium",
                   "G": ""}


def test_a_line_that_is_not_key_value_names_the_file_and_line(tmp_path):
    (tmp_path / ".env").write_text("A=1\nMINPREFIX_MODEL ../shared/models/imdb-gpt2-19m\n")
    with pytest.raises(ValueError, match=r"\.env:2: expected KEY=VALUE"):
        env.read_env(tmp_path / ".env")


def test_the_environment_wins_and_a_missing_file_sets_nothing(tmp_path, capsys):
    (tmp_path / ".env").write_text("MINPREFIX_MODEL=../m\nTIKTOKEN_CACHE_DIR=../t\n")
    environ = {"MINPREFIX_MODEL": "gpt2"}
    taken = env.load_env(tmp_path / ".env", environ)
    assert taken == {"TIKTOKEN_CACHE_DIR": str(tmp_path.parent / "t")}
    assert environ == {"MINPREFIX_MODEL": "gpt2", "TIKTOKEN_CACHE_DIR": str(tmp_path.parent / "t")}
    assert "TIKTOKEN_CACHE_DIR=" in capsys.readouterr().err  # says what it took, and from where
    assert env.load_env(tmp_path / "nothing-here", environ) == {}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reads_the_checkouts_env_before_its_flags(script, tmp_path, monkeypatch, capsys, clean):
    (tmp_path / ".env").write_text(f"{KEY}=from-the-file\n")
    monkeypatch.setattr(env, "ROOT", tmp_path)  # the checkout's .env, moved aside for the test
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", [str(REPO / Path(script).parent)] + sys.path)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert e.value.code in (0, None)
    assert os.environ.get(KEY) == "from-the-file" and f"{KEY}=from-the-file" in capsys.readouterr().err

