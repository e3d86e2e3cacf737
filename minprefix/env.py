"""Settings a checkout keeps in a file, so that a new shell needs no exports: `.env` at the checkout's root.

  # .env (start from .env.example): KEY=VALUE lines; '#' starts a comment line; blank lines are skipped
  MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m
  TIKTOKEN_CACHE_DIR=../shared/tiktoken

A variable already set in the environment wins over the file. A value starting with ./ or ../ is a path relative
to the file's folder, so the scripts find it from any working directory. Only the scripts read it (train.py,
sample.py, eval.py, experiments/, bench/), each once before it parses its flags; importing minprefix never does.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: minprefix/'s parent


def read_env(path):
    """-> {KEY: VALUE} from a .env file; a line that is not KEY=VALUE (or a comment) is an error naming it."""
    values = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{n}: expected KEY=VALUE (or a # comment), got {line!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # KEY="a value" as a shell would read it
        if value.startswith(("./", "../")):
            value = os.path.normpath(Path(path).resolve().parent / value)
        values[key] = value
    return values


def load_env(path=None, environ=os.environ, say=True):
    """Set each variable of `path` (default: the checkout's .env) that `environ` does not hold yet; a missing file
    sets nothing. -> {KEY: VALUE} of the variables it set; with say, one line on stderr names them and the file."""
    path = Path(path) if path is not None else ROOT / ".env"
    if not path.is_file():
        return {}
    taken = {k: v for k, v in read_env(path).items() if k not in environ}
    environ.update(taken)
    if taken and say:
        print(f"{path}: " + ", ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr)
    return taken
