"""Distributed encode: every rank embeds a shard, rank 0 receives all embeddings in input order.

Texts are dealt to ranks round-robin in order of decreasing length, so the shards carry about the same
number of tokens. Works with any ``torch.distributed`` backend (CPU buffers for gloo, the model's CUDA
device for NCCL); every rank must call it with the same texts and options (checked: a ValueError on every
rank, also when one rank refuses its arguments).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from llmembed_fast import _poison

# what every rank must agree on besides the texts (their results differ otherwise: rows would mix)
_SAME_OPTIONS = ("instruction", "prompt", "normalize", "dims", "packed")


def _process_group():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group "
            "(run under torchrun and call torch.distributed.init_process_group)"
        )
    return dist


def _exchange_ids(mine: list[int], dev) -> list[tuple[int, ...]]:
    dist = _process_group()
    t = torch.tensor(mine, dtype=torch.int64, device=dev)
    ids = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, t)
    return [tuple(x.tolist()) for x in ids]


def fail_everywhere(embedder, error: Exception):
    """Raise ``error`` (an argument check that failed on this rank) after telling the other ranks, which are
    waiting in ``encode_sharded``'s first collective: they raise too instead of waiting for good."""
    dist = _process_group()
    dev = embedder.device if dist.get_backend() == "nccl" else torch.device("cpu")
    _exchange_ids([-1, 0, 0], dev)
    raise error


def encode_sharded(embedder, texts: list[str], *, show_progress_bar: bool = False, **kwargs):
    """Float32 embeddings [N, D] on rank 0 (on the model's device), None on other ranks."""
    dist = _process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = embedder.device if dist.get_backend() == "nccl" else torch.device("cpu")
    # every rank's (count, checksum of the texts, checksum of the options): ranks holding different lists or
    # options would otherwise mix rows; each text is length-prefixed (a separator could occur in a text)
    digest = 0
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        digest = zlib.crc32(struct.pack("<Q", len(b)) + b, digest)
    options = zlib.crc32(repr([kwargs.get(k) for k in _SAME_OPTIONS]).encode("utf-8", "surrogatepass"))
    ids = _exchange_ids([len(texts), digest, options], dev)
    refused = [r for r, x in enumerate(ids) if x[0] < 0]
    if refused:
        raise ValueError(f"distributed encode: rank(s) {refused} refused their arguments (their errors say "
                         "why)")
    if len(set(ids)) > 1:
        raise ValueError(
            "distributed encode needs the same texts on every rank, with the same options ("
            + ", ".join(_SAME_OPTIONS) + "); got (count, crc32 of the texts, crc32 of the options) = "
            + ", ".join(f"rank {r}: {x}" for r, x in enumerate(ids))
        )
    order = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    mine = order[rank::world]
    local, error = None, None
    if len(mine):
        try:
            local = embedder.encode_float(
                [texts[i] for i in mine], show_progress_bar=show_progress_bar and rank == 0, **kwargs
            )
        except Exception as e:  # every rank must hear of it, or the others wait in the gather for good
            error = e
    # (ok, width) of every rank: the width is the output's (ranks without texts have none to look at)
    state = torch.tensor([int(error is None), 0 if local is None else local.shape[1]], dtype=torch.int64,
                         device=dev)
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    if error is not None:
        raise error
    failed = [r for r, t in enumerate(states) if int(t[0]) == 0]
    if failed:
        raise RuntimeError(f"distributed encode failed on rank(s) {failed} (their own errors say why)")
    widths = {int(t[1]) for t in states} - {0}  # 0: a rank without texts
    if len(widths) > 1:  # the options agree: a model or embedder that differs between the ranks
        raise ValueError(f"distributed encode: the ranks' embeddings differ in width ({sorted(widths)}): "
                         "load the same model and settings on every rank")
    width = max(widths, default=0)
    n_max = -(-len(texts) // world)
    buf = torch.zeros(n_max, width, dtype=torch.float32, device=dev)
    if local is not None:
        buf[: len(mine)] = local.to(dev)
    gathered = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, gathered, dst=0)
    if rank != 0:
        return None
    out = _poison.empty(len(texts), width, dtype=torch.float32, device=embedder.device)
    for r in range(world):
        idx = order[r::world]
        out[torch.from_numpy(idx).to(out.device)] = gathered[r][: len(idx)].to(out.device)
    return out
