"""Shared autograd guards for the fused ops."""

from __future__ import annotations

import functools

import torch


def no_double_backward(op: str) -> None:
    """Raise inside a backward run with ``create_graph=True``: the fused backward kernels are not themselves
    differentiable, so a second-order gradient through them would be silently wrong (autograd enables grad
    mode in a backward exactly when the caller asked for a graph of it)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (create_graph=True): its backward is a "
                           "fused kernel, not differentiable")


def saveable(*xs):
    """``xs`` with every inference-mode tensor cloned when autograd will record the op (grad mode on and an
    input requires grad): a Function cannot save an inference tensor for backward, and a frozen tower's
    embeddings or a mask made under ``torch.inference_mode()`` meet trainable inputs in ordinary training."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return xs
    return tuple(x.clone() if isinstance(x, torch.Tensor) and torch.is_inference(x) else x for x in xs)


def no_autocast(fn):
    """Run a Function's forward / backward with autocast off on its first input's device type: the op
    computes in its inputs' dtype whatever the caller's autocast state (the backward may run inside one),
    so the torch and Triton paths agree under autocast."""

    @functools.wraps(fn)
    def run(ctx, *args):
        if fn.__name__ == "forward":
            ctx.autocast_device = args[0].device.type
        dev = ctx.autocast_device
        if not torch.amp.is_autocast_available(dev):
            return fn(ctx, *args)
        with torch.autocast(device_type=dev, enabled=False):
            return fn(ctx, *args)

    return run
