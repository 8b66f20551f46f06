"""Output allocation for kernels, poisoned in tests.

With ``LLMEMBED_FAST_POISON=1`` (tests/conftest.py sets it) every buffer a kernel is meant to fill
completely is allocated full of NaN (float) or of the dtype's most negative value (integer), so an element
the kernel fails to write makes the test fail. Otherwise it is ``torch.empty``.
"""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("LLMEMBED_FAST_POISON", "0") == "1"


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(shape)``, or a poisoned buffer when LLMEMBED_FAST_POISON=1."""
    if not poison_enabled():
        return torch.empty(*shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(*shape, dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
