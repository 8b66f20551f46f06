"""Shared autograd guards for the fused ops."""

from __future__ import annotations

import contextlib
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


def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, a constant to torch.compile: torch 2.11's dynamo cannot trace the
    builtin behind it (fullgraph=True failed on lf.l2_normalize / lf.matryoshka)."""
    return torch.amp.is_autocast_available(device_type)


# What torch.compiler.assume_constant_result does (torch 2.11 - 2.14), without importing torch._dynamo when
# llmembed_fast is imported (the decorator does under torch 2.11, and dynamo doubles the import time).
_autocast_available._dynamo_marked_constant = True


def op_context(fn):
    """Run a Function's forward / backward with autocast off on its first input's device type, and on CUDA
    with that input's device current. The op computes in its inputs' dtype whatever the caller's autocast
    state (the backward may run inside one), so the torch and Triton paths agree under autocast; and Triton
    launches on the current device and its current stream, not on the tensors' device (tensors on cuda:1
    while cuda:0 is current failed to launch, or raced with cuda:1's stream)."""

    @functools.wraps(fn)
    def run(ctx, *args):
        if fn.__name__ == "forward":
            ctx.op_device = args[0].device
        dev = ctx.op_device
        with contextlib.ExitStack() as stack:
            # only when on: entering an autocast context is a graph break under torch.compile
            if _autocast_available(dev.type) and torch.is_autocast_enabled(dev.type):
                stack.enter_context(torch.autocast(device_type=dev.type, enabled=False))
            if dev.type == "cuda":
                stack.enter_context(torch.cuda.device(dev))
            return fn(ctx, *args)

    return run
