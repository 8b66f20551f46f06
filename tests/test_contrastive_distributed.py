"""contrastive_loss with a process group (gloo, spawned CPU processes, world sizes 2 and 3): every rank's
loss and gradients equal one process computing the global batch (fp32, rtol 1e-5). Ranks hold different
numbers of queries and candidates (uneven all-gathers)."""

import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llmembed_fast as lf

CONFIGS = [
    dict(),
    dict(symmetric=True),
    dict(same_tower=True, false_negative_margin=0.1),
    dict(
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.05,
        matryoshka_dims=(6, 16),
        matryoshka_weights=(0.5, 1.0),
    ),
    dict(reduction="sum", normalize=False),
]
D = 16


def _local_batch(rank: int, seed: int):
    """Rank r holds 2 + r queries and 2 + r + (r % 2) candidates (hard negative on odd ranks)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    b = 2 + rank
    n = b + rank % 2
    q = torch.randn(b, D, generator=g)
    d = torch.randn(n, D, generator=g)
    labels = torch.randperm(n, generator=g)[:b]
    return q, d, labels


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective the others never join fails instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for seed, cfg in enumerate(CONFIGS):
            q, d, labels = _local_batch(rank, seed)
            q.requires_grad_()
            d.requires_grad_()
            tau = torch.tensor(0.05 if cfg.get("normalize", True) else 3.0, requires_grad=True)
            loss = lf.contrastive_loss(q, d, labels=labels, temperature=tau, group=dist.group.WORLD, **cfg)
            loss.backward()
            results.append(dict(loss=loss.detach(), gq=q.grad, gd=d.grad, gt=tau.grad))
        # the gather alone: values and the reduce-back of gradients
        x = torch.full((rank + 1, 3), float(rank), requires_grad=True)
        y = lf.distributed.all_gather_with_grad(x)
        (y * torch.arange(y.shape[0], dtype=torch.float32)[:, None]).sum().backward()
        results.append(dict(gathered=y.detach(), gx=x.grad))
        # a double backward through the gather is refused (its all-reduce is not differentiable)
        x = torch.ones(2, 3, requires_grad=True)
        (g,) = torch.autograd.grad((lf.distributed.all_gather_with_grad(x) ** 2).sum(), x, create_graph=True)
        try:
            g.sum().backward()
            double = "no error"
        except RuntimeError as exc:
            double = str(exc)
        # ranks disagreeing on the embeddings' dtype or width: the same ValueError on every rank (the byte
        # copies of the gathers would crash gloo or silently mix bf16 and fp16 bits)
        errors = []
        for dtype, width in (((torch.bfloat16, torch.float16)[rank % 2], D), (torch.float32, D - rank)):
            q, d, labels = _local_batch(rank, 0)
            try:
                lf.contrastive_loss(q[:, :width].to(dtype), d[:, :width].to(dtype), group=dist.group.WORLD)
                errors.append("no error")
            except ValueError as exc:
                errors.append(str(exc))
        try:
            half = (torch.bfloat16, torch.float16)[rank % 2]
            lf.distributed.all_gather_with_grad(torch.ones(2, 4, dtype=half))
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
        # one rank's inputs fail the checks (labels out of range, no query rows): it raises its own error,
        # the others a ValueError naming it, instead of waiting in a collective for it
        rejected = []
        for bad in ("labels", "empty"):
            q, d, labels = _local_batch(rank, 0)
            if rank == 1 and bad == "labels":
                labels = labels + 100
            if rank == 1 and bad == "empty":
                q = q[:0]
            try:
                lf.contrastive_loss(q, d, labels=labels[: q.shape[0]], group=dist.group.WORLD)
                rejected.append("no error")
            except ValueError as exc:
                rejected.append(str(exc))
        results.append(dict(double=double, errors=errors, rejected=rejected))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        gc.collect()  # as in test_embedder_distributed: no gloo work left to a rank's exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_global_batch(world, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for seed, cfg in enumerate(CONFIGS):
        batches = [_local_batch(r, seed) for r in range(world)]
        d_off = [0]
        for _, d, _ in batches:
            d_off.append(d_off[-1] + d.shape[0])
        q = torch.cat([b[0] for b in batches]).requires_grad_()
        d = torch.cat([b[1] for b in batches]).requires_grad_()
        labels = torch.cat([b[2] + d_off[r] for r, b in enumerate(batches)])
        tau = torch.tensor(0.05 if cfg.get("normalize", True) else 3.0, requires_grad=True)
        loss = lf.contrastive_loss(q, d, labels=labels, temperature=tau, **cfg)
        loss.backward()
        q_off = 0
        for r in range(world):
            res = per_rank[r][seed]
            b, n = batches[r][0].shape[0], batches[r][1].shape[0]
            torch.testing.assert_close(
                res["loss"], loss.detach(), rtol=1e-5, atol=1e-6, msg=f"loss {cfg} rank {r}"
            )
            torch.testing.assert_close(
                res["gq"], q.grad[q_off : q_off + b], rtol=1e-5, atol=1e-6, msg=f"grad q {cfg} rank {r}"
            )
            torch.testing.assert_close(
                res["gd"], d.grad[d_off[r] : d_off[r] + n], rtol=1e-5, atol=1e-6, msg=f"grad d {cfg} rank {r}"
            )
            q_off += b
        # temperature: each rank holds its share; the shares sum to the global gradient (they may cancel:
        # the tolerance is relative to their magnitudes)
        shares = [per_rank[r][seed]["gt"] for r in range(world)]
        scale = sum(s.abs() for s in shares).item()
        torch.testing.assert_close(
            sum(shares), tau.grad, rtol=1e-5, atol=1e-5 * scale, msg=f"grad temperature {cfg}"
        )
    # all_gather_with_grad: rank-ordered rows; gradient = rows' weights summed over ranks
    rows = torch.cat([torch.full((r + 1, 3), float(r)) for r in range(world)])
    start = 0
    for r in range(world):
        res = per_rank[r][-1]
        assert "once_differentiable" in res["double"], res["double"]
        assert all("same width and dtype on every rank" in e for e in res["errors"]), res["errors"]
        want = ["labels must be in", "at least one row"] if r == 1 else ["rank(s) [1]"] * 2
        assert all(w in e for w, e in zip(want, res["rejected"], strict=True)), res["rejected"]
        res = per_rank[r][-2]
        torch.testing.assert_close(res["gathered"], rows)
        expect = world * torch.arange(start, start + r + 1, dtype=torch.float32)[:, None].expand(r + 1, 3)
        torch.testing.assert_close(res["gx"], expect)
        start += r + 1


def test_distributed_requires_init():
    with pytest.raises(RuntimeError, match="not initialized"):
        lf.distributed.all_gather_with_grad(torch.randn(2, 3))


def test_all_gather_sizes_are_checked(tmp_path):
    """A given ``sizes`` must list every rank's rows, this rank's matching x (a longer entry padded the
    gathered rows with zeros, a shorter one or a wrong count failed inside gloo); a bad group is a TypeError
    even before init."""
    with pytest.raises(TypeError, match="group"):
        lf.distributed.all_gather_with_grad(torch.randn(2, 3), group="x")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 2)
        torch.testing.assert_close(lf.distributed.all_gather_with_grad(x, sizes=[3]), x)
        for sizes, msg in (([4], r"sizes\[0\] = 4"), ([2], r"sizes\[0\] = 2"), ([3, 3], "1 ints"),
                           ("3", "1 ints"), ([3.0], "1 ints"), ([-1], "1 ints")):
            with pytest.raises(ValueError, match=msg):
                lf.distributed.all_gather_with_grad(x, sizes=sizes)
    finally:
        dist.destroy_process_group()
