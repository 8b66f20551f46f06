"""GradCache under DistributedDataParallel with cross-device negatives, on 2 gloo ranks (spawned CPU
processes): the parameter gradients equal the single-process gradients of the global batch, and DDP
all-reduces once per step (every chunk's backward but the last runs under no_sync)."""
from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_grad_cache import Encoder, make_batch, make_model  # noqa: E402

WORLD, B_LOCAL, N_LOCAL, CHUNK = 2, 5, 7, 2


def _global_batches():
    """Every rank's query and document batches (rank r's are rows of the r-th block)."""
    qs = [make_batch(B_LOCAL, 100 + r) for r in range(WORLD)]
    ds = [make_batch(N_LOCAL, 200 + r) for r in range(WORLD)]
    return qs, ds


CONFIGS = [{}, {"symmetric": True, "same_tower": True, "matryoshka_dims": (8, 32), "temperature": 0.1}]


def _worker(rank: int, init_file: str):
    os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for kwargs in CONFIGS:
            _check(rank, kwargs)
        # DDP reducers sit in reference cycles (comm hook closures): free them while the process group is
        # alive, or a reducer thread can be destroyed joinable at exit (SIGABRT, seen once in CI).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(rank: int, kwargs: dict):
    import llmembed_fast as lf
    from llmembed_fast.training import GradCache

    qs, ds = _global_batches()
    labels_local = torch.arange(B_LOCAL)
    # single-process reference over the global batch
    ref = Encoder(make_model("qwen2", 0.0), 0.0)
    q = ref({k: torch.cat([b[k] for b in qs]) for k in qs[0]})
    d = ref({k: torch.cat([b[k] for b in ds]) for k in ds[0]})
    labels = torch.cat([labels_local + r * N_LOCAL for r in range(WORLD)])
    loss_ref = lf.contrastive_loss(q, d, labels=labels, **kwargs)
    loss_ref.backward()
    want = {k: p.grad.clone() for k, p in ref.named_parameters()}

    enc = Encoder(make_model("qwen2", 0.0), 0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(enc)
    calls = [0]

    def counting_allreduce(state, bucket):
        calls[0] += 1
        t = bucket.buffer().div_(WORLD)
        return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    cache = GradCache(ddp, lf.contrastive_loss, CHUNK, grad_multiplier=WORLD)
    loss = cache.step(qs[rank], ds[rank], labels=labels_local, group=dist.group.WORLD, **kwargs)
    got = {k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    scale = max(w.abs().max().item() for w in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")
    synced = calls[0]
    # an uncached DDP backward over the local batch makes the same number of all-reduce calls
    ddp.zero_grad()
    calls[0] = 0
    lf.contrastive_loss(ddp(qs[rank]), ddp(ds[rank]), labels=labels_local, group=dist.group.WORLD,
                        **kwargs).backward()
    assert synced == calls[0] >= 1, (kwargs, synced, calls[0])


def test_ddp_cross_device_negatives_match_global(tmp_path):
    """Plain InfoNCE, and symmetric + same_tower + Matryoshka, with hard negatives on every rank."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
