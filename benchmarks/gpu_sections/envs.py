"""Environment switches for the sections (a helper, not a section)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def env(key: str, value: str | None):
    """os.environ[key] = value inside the block (None: unset), restored (or removed) after it."""
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
