"""RNG state capture and replay, so a chunk's second forward draws the same random numbers (dropout
masks) as its first.

A :class:`RngState` holds the CPU generator's state and the states of the CUDA generators of the given
devices. Capturing reads host-side generator states only (no device synchronization).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def cuda_devices_of(*objs) -> list[int]:
    """CUDA device indices of the tensors in ``objs`` (tensors, or dicts / lists of tensors), plus the
    current CUDA device when CUDA is initialized (a model may draw on it with CPU inputs). Sorted."""
    found: set[int] = set()

    def visit(x):
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                found.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for o in objs:
        visit(o)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        found.add(torch.cuda.current_device())
    return sorted(found)


class RngState:
    """The CPU generator state plus the CUDA generator states of ``devices`` at construction time."""

    __slots__ = ("cpu", "cuda")

    def __init__(self, devices: Iterable[int] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = {int(d): torch.cuda.get_rng_state(d) for d in devices}

    def restore(self) -> None:
        """Set the generators back to the captured states."""
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)


@contextlib.contextmanager
def preserved_rng(devices: Iterable[int] = ()):
    """Run a block that rewinds the generators (replays) and leave them as they were on entry."""
    saved = RngState(devices)
    try:
        yield
    finally:
        saved.restore()
