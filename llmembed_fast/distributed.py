"""Cross-device negatives: gather embeddings with gradients, and the rank bookkeeping the losses need.

``all_gather_with_grad(x)`` concatenates every rank's ``x`` along dim 0 (ranks may hold different numbers
of rows); its backward sums the gradient of the gathered tensor over ranks and hands each rank the rows
it owns, so a loss computed on gathered tensors gives each rank the gradient of the sum of all ranks'
losses w.r.t. its own inputs. Works with any backend (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# dtype codes exchanged by batch_layout / gather_sizes: ranks must agree before a byte-level all-gather
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _check_agree(rows: list[list[int]], what: str) -> None:
    """Raise the same ValueError on every rank when the ranks' (width, dtype) entries differ."""
    seen = {(r[-2], r[-1]) for r in rows}
    if len(seen) > 1:
        per_rank = ", ".join(
            f"rank {i}: [.., {r[-2]}] {_DTYPES[r[-1]] if r[-1] < len(_DTYPES) else 'other'}"
            for i, r in enumerate(rows)
        )
        raise ValueError(f"{what} must have the same width and dtype on every rank, got {per_rank}")


def _check_group(group) -> None:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized (call torch.distributed.init_process_group first)"
        )


def _collective_device(x_device: torch.device, group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "gloo" and x_device.type != "cpu":
        return torch.device("cpu")
    if backend == "nccl" and x_device.type == "cpu":  # NCCL moves CUDA buffers only
        return torch.device("cuda", torch.cuda.current_device())
    return x_device


def gather_sizes(n: int, group=None, device=None, like: torch.Tensor | None = None) -> list[int]:
    """Every rank's ``n`` (e.g. its row count), in rank order. ``like``: a tensor whose row width (the
    product of its trailing dims) and dtype every rank must share; ValueError on all ranks otherwise."""
    _check_group(group)
    dev = _collective_device(torch.device(device) if device is not None else torch.device("cpu"), group)
    world = dist.get_world_size(group)
    width = math.prod(like.shape[1:]) if like is not None else 0
    code = _dtype_code(like.dtype) if like is not None else 0
    mine = torch.tensor([n, width, code], dtype=torch.int64, device=dev)
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    rows = torch.stack(bufs).cpu().tolist()
    _check_agree(rows, "the gathered tensor")
    return [r[0] for r in rows]


class BatchLayout(NamedTuple):
    """Where this rank's queries and candidates sit in the global (rank-ordered) batch."""

    world: int
    rank: int
    q_sizes: list[int]
    d_sizes: list[int]
    q_offset: int
    d_offset: int
    q_total: int
    d_total: int


def batch_layout(b: int, n: int, group=None, device=None, width: int = 0, dtype=None,
                 ok: bool = True) -> BatchLayout:
    """Gathers (b, n) = (local queries, local candidates) from every rank in one collective, with the
    embeddings' ``width`` and ``dtype``, which every rank must share (ValueError on all ranks otherwise:
    the gathers that follow copy bytes). ``ok=False``: this rank rejected its inputs; every rank raises
    ValueError (so none waits in a later collective for it)."""
    _check_group(group)
    dev = _collective_device(torch.device(device) if device is not None else torch.device("cpu"), group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    code = _dtype_code(dtype) if dtype is not None else 0
    mine = torch.tensor([int(bool(ok)), b, n, int(width), code], dtype=torch.int64, device=dev)
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    rows = torch.stack(bufs).cpu().tolist()
    failed = [r for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise ValueError(f"rank(s) {failed} of the group rejected their inputs (their error says why)")
    _check_agree(rows, "q and d")
    sizes = [row[1:3] for row in rows]
    q_sizes, d_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
    return BatchLayout(
        world, rank, q_sizes, d_sizes, sum(q_sizes[:rank]), sum(d_sizes[:rank]), sum(q_sizes), sum(d_sizes)
    )


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        rank = dist.get_rank(group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        dev = _collective_device(x.device, group)
        top = max(sizes)
        padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=dev)
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(bufs, padded, group=group)
        return torch.cat([buf[:s] for buf, s in zip(bufs, sizes, strict=False)]).to(x.device)

    @staticmethod
    @once_differentiable  # the all-reduce below is not recorded: a double backward would be silently wrong
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        dev = _collective_device(grad.device, group)
        if dist.get_backend(group) == "nccl" and len(set(sizes)) == 1:
            out = torch.empty((sizes[rank], *grad.shape[1:]), dtype=grad.dtype, device=dev)
            # on the collective's device (NCCL: CUDA) like out, whatever device the caller's tensors are on
            dist.reduce_scatter_tensor(out, grad.to(dev).contiguous(), op=dist.ReduceOp.SUM, group=group)
            return out.to(grad.device), None, None
        total = grad.to(dev, copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        start = sum(sizes[:rank])
        return total[start : start + sizes[rank]].to(grad.device), None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` [n_r, ...] along dim 0 -> [sum n_r, ...], differentiable.

    ``sizes`` (every rank's n_r) saves one collective when known. The backward sums the incoming
    gradient over ranks (reduce-scatter, or all-reduce + slice) and returns this rank's rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the rows to gather)")
    _check_group(group)
    if sizes is None:
        sizes = gather_sizes(x.shape[0], group=group, device=x.device, like=x)
    else:  # checked here, without a collective: a wrong list padded rows with zeros or failed in gloo/nccl
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (
            isinstance(sizes, (str, bytes))
            or not hasattr(sizes, "__len__")
            or len(sizes) != world
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in sizes)
        ):
            raise ValueError(f"sizes must list every rank's row count ({world} ints >= 0), got {sizes!r}")
        if sizes[rank] != x.shape[0]:
            raise ValueError(f"sizes[{rank}] = {sizes[rank]} but this rank's x has {x.shape[0]} rows")
        sizes = [int(s) for s in sizes]
    return _AllGatherWithGrad.apply(x.contiguous(), group, list(sizes))


def global_value(partial: torch.Tensor, group=None) -> torch.Tensor:
    """``partial`` with its value replaced by the sum over ranks; the gradient still flows to this rank's
    ``partial`` only (so gradients w.r.t. gathered inputs are not counted once per rank)."""
    _check_group(group)
    dev = _collective_device(partial.device, group)
    total = partial.detach().to(dev, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return partial + (total.to(partial.device) - partial.detach())
