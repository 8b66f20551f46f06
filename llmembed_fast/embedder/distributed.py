"""Distributed encode: every rank embeds a shard, rank 0 receives all embeddings in input order.

Texts are dealt to ranks round-robin in order of decreasing length, so the shards carry about the same
number of tokens. Works with any ``torch.distributed`` backend (CPU buffers for gloo, the model's CUDA
device for NCCL); every rank must call it with the same texts.
"""

from __future__ import annotations

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
    order = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    mine = order[rank::world]
    dims = kwargs.get("dims")
    width = dims or embedder.dims or embedder.embedding_dim
    dev = embedder.device if dist.get_backend() == "nccl" else torch.device("cpu")
    n_max = -(-len(texts) // world)
    buf = torch.zeros(n_max, width, dtype=torch.float32, device=dev)
    if len(mine):
        local = embedder.encode_float(
            [texts[i] for i in mine], show_progress_bar=show_progress_bar and rank == 0, **kwargs
        )
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
