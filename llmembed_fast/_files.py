"""Files written all or nothing (the index files, the CLI's outputs)."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, fill: Callable[[BinaryIO], None],
                 prefix: str = ".llmembed-") -> None:
    """Write the file ``path`` all or nothing: ``fill(f)`` writes a temporary file in the same folder,
    which is then fsynced and renamed over ``path`` (through a symlink, to the file it names), so an
    existing file stays whole until then; on any failure (Ctrl-C too) the temporary file is removed. The new
    file gets the mode ``open()`` would give it (an existing one keeps its own), and the rename is made
    durable where the platform allows."""
    target = os.path.realpath(path)  # the temporary name is short, so any valid file name works
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        try:  # mkstemp creates 0600
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # best effort: not every platform can open a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def umask() -> int:
    """The process umask: from /proc where it is shown (no window in which other threads see umask 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # reading the umask means setting it: restore at once
    os.umask(mask)
    return mask
