"""Shared autograd guard for the fused ops."""

from __future__ import annotations

import torch


def no_double_backward(op: str) -> None:
    """Raise inside a backward run with ``create_graph=True``: the fused backward kernels are not themselves
    differentiable, so a second-order gradient through them would be silently wrong (autograd enables grad
    mode in a backward exactly when the caller asked for a graph of it)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (create_graph=True): its backward is a "
                           "fused kernel, not differentiable")
