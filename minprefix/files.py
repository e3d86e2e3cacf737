"""Writing files so that a crash or Ctrl-C mid-write leaves the previous file, never half of one."""
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """with atomic_path(p) as tmp: write(tmp) -> the file appears at p only once the block has finished."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; what we write is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
