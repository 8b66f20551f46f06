"""Warnings attributed to the caller's code: the first frame outside llmembed_fast and torch (a fixed
``stacklevel`` points into the package, or into torch's wrappers, whenever the call path changes)."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INSIDE = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__)
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first stack frame outside llmembed_fast and torch."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
