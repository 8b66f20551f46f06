"""Distributed encode: every rank embeds a shard, rank 0 receives all embeddings in input order.

Texts are dealt to ranks round-robin in order of decreasing length, so the shards carry about the same
number of tokens. Works with any ``torch.distributed`` backend (CPU buffers for gloo, the model's CUDA
device for NCCL); every rank must call it with the same texts (checked: a ValueError on every rank).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from llmembed_fast import _poison


def encode_sharded(embedder, texts: list[str], *, show_progress_bar: bool = False, **kwargs):
    """Float32 embeddings [N, D] on rank 0 (on the model's device), None on other ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group "
            "(run under torchrun and call torch.distributed.init_process_group)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = embedder.device if dist.get_backend() == "nccl" else torch.device("cpu")
    # every rank's (count, checksum) of the texts: ranks holding different lists would otherwise swap rows
    digest = 0
    for t in texts:
        digest = zlib.crc32(t.encode("utf-8", "surrogatepass") + b"\x00", digest)
    mine_id = torch.tensor([len(texts), digest], dtype=torch.int64, device=dev)
    ids = [torch.empty_like(mine_id) for _ in range(world)]
    dist.all_gather(ids, mine_id)
    if len({tuple(t.tolist()) for t in ids}) > 1:
        raise ValueError("distributed encode needs the same texts on every rank; got (count, crc32) = "
                         + ", ".join(f"rank {r}: {tuple(t.tolist())}" for r, t in enumerate(ids)))
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
    width = max(int(t[1]) for t in states)
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
