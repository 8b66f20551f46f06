"""GradCache under DistributedDataParallel with cross-device negatives, on 2 gloo ranks (spawned CPU
processes): the parameter gradients equal the single-process gradients of the global batch, and DDP
all-reduces once per step (every chunk's backward but the last runs under no_sync)."""
from __future__ import annotations

import contextlib
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

    ddp, calls = _counting_ddp(Encoder(make_model("qwen2", 0.0), 0.0))
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


# ---------------------------------------------------------------------------------------------------
# uneven local batches (different chunk counts per rank) through the integrations, whose encoders are
# functions calling the DDP module: one synchronization per step, no deadlock
# ---------------------------------------------------------------------------------------------------

UNEVEN_B, UNEVEN_N, UNEVEN_TRIPLETS = (3, 5), (6, 5), (3, 5)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))


def _counting_ddp(module, **kw):
    ddp = torch.nn.parallel.DistributedDataParallel(module, **kw)
    calls = [0]

    def counting_allreduce(state, bucket):
        calls[0] += 1
        t = bucket.buffer().div_(WORLD)
        return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    return ddp, calls


def _assert_grads(got: dict, want: dict, rtol: float = 1e-5):
    assert got.keys() == want.keys() and want
    scale = max(w.abs().max().item() for w in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _check_wrapped_encoders(rank: int, tmp: str):
    import llmembed_fast as lf
    from llmembed_fast.integrations.hf_trainer import GradCacheTrainer
    from llmembed_fast.training import GradCache

    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(b, 12, generator=g) for b in UNEVEN_B]
    ds = [torch.randn(n, 12, generator=g) for n in UNEVEN_N]
    ref = _mlp()
    labels = torch.cat([torch.arange(b) + sum(UNEVEN_N[:r]) for r, b in enumerate(UNEVEN_B)])
    loss_ref = lf.contrastive_loss(ref(torch.cat(qs)), ref(torch.cat(ds)), labels=labels)
    loss_ref.backward()
    want = {k: p.grad for k, p in ref.named_parameters()}

    # GradCache with a lambda encoder, synchronized through sync_module
    ddp, calls = _counting_ddp(_mlp())
    gc = GradCache(lambda x: ddp(x), lf.contrastive_loss, 2, grad_multiplier=WORLD, sync_module=ddp)
    loss = gc.step(qs[rank], ds[rank], group=dist.group.WORLD)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    _assert_grads({k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}, want)
    assert calls[0] == 1, calls[0]

    # GradCacheTrainer.compute_loss with encode= (forward mode); grad_multiplier from the group
    from transformers import TrainingArguments

    ddp, calls = _counting_ddp(_mlp())
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    trainer = GradCacheTrainer(model=ddp.module, args=args, chunk_size=2,
                               encode=lambda model, chunk: model(chunk["x"]),
                               loss_kwargs={"group": dist.group.WORLD})
    loss = trainer.compute_loss(ddp, {"query": {"x": qs[rank]}, "doc": {"x": ds[rank]}})
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=0)
    _assert_grads({k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}, want)
    assert calls[0] == 1, calls[0]


def _check_two_ddp_towers(rank: int):
    """A query model and a document model, each in its own DDP, with chunk counts that differ between the
    ranks (rank 0: 1 query chunk, 2 document chunks; rank 1: 3 and 1): their reductions ran in a
    rank-dependent order, so each rank's query-model all-reduce met the other's document-model one (same
    sizes here: silently mixed gradients)."""
    import llmembed_fast as lf
    from llmembed_fast.training import GradCache

    def models():
        mq, md = _mlp(), _mlp()
        with torch.no_grad():
            for p in md.parameters():
                p.mul_(-0.5)
        return mq, md

    shapes = [(1, 6), (3, 3)]  # (queries, documents) per rank
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(b, 12, generator=g) for b, _ in shapes]
    ds = [torch.randn(n, 12, generator=g) for _, n in shapes]
    rq, rd = models()
    labels = torch.cat([torch.arange(b) + sum(n for _, n in shapes[:r]) for r, (b, _) in enumerate(shapes)])
    lf.contrastive_loss(rq(torch.cat(qs)), rd(torch.cat(ds)), labels=labels, temperature=0.1).backward()
    mq, md = models()
    (dq, calls_q), (dd, calls_d) = _counting_ddp(mq), _counting_ddp(md)
    gcache = GradCache(dq, lf.contrastive_loss, 1, doc_encoder=dd, doc_chunk_size=3, grad_multiplier=WORLD)
    gcache.step(qs[rank], ds[rank], group=dist.group.WORLD, temperature=0.1)
    grads = lambda m: {k: p.grad for k, p in m.named_parameters()}  # noqa: E731
    _assert_grads(grads(mq), grads(rq))
    _assert_grads(grads(md), grads(rd))
    assert calls_q[0] == calls_d[0] == 1, (calls_q, calls_d)


class _Routed(torch.nn.Module):
    """Queries through a trainable MLP, documents (rows flagged "doc") through a frozen one."""

    def __init__(self):
        super().__init__()
        self.q, self.d = _mlp(), _mlp().requires_grad_(False)

    def forward(self, batch):
        return self.d(batch["x"]) if bool(batch["doc"].all()) else self.q(batch["x"])


class _WithTemperature(torch.nn.Module):
    """One MLP for both sides and a learnable temperature registered on the model (as GradCacheTrainer asks
    of a loss's parameters)."""

    def __init__(self):
        super().__init__()
        import llmembed_fast as lf

        self.enc = _mlp()
        self.crit = lf.ContrastiveLoss(temperature=0.1, learn_temperature=True)

    def forward(self, batch):
        return self.enc(batch["x"])


def _check_frozen_routes_and_loss_leaves(rank: int):
    """Under DDP (find_unused_parameters=False, the default): a module routing the documents to a frozen
    part, whose last re-run chunk has no graph (no all-reduce happened: each rank kept its own gradients);
    a frozen teacher doc_encoder beside sync_module=; a learnable temperature registered on the model, its
    gradient taken outside the synchronized backward (unsynchronized gradients in step(), an internal
    DDP assert on forward()'s second step). Each against the mean of the ranks' uncached gradients."""
    import llmembed_fast as lf
    from llmembed_fast.training import GradCache

    def batches(r, step):
        g = torch.Generator().manual_seed(100 * r + step)
        return ({"x": torch.randn(6, 12, generator=g), "doc": torch.zeros(6, dtype=torch.bool)},
                {"x": torch.randn(6, 12, generator=g), "doc": torch.ones(6, dtype=torch.bool)})

    def want_grads(make, loss_of, step):
        out = {}
        for r in range(WORLD):
            ref = make()
            q, d = batches(r, step)
            loss_of(ref, ref(q), ref(d)).backward()
            for k, p in ref.named_parameters():
                if p.grad is not None:
                    out[k] = out.get(k, 0) + p.grad / WORLD
        return out

    plain = lambda m, q, d: lf.contrastive_loss(q, d)  # noqa: E731
    for chunk in (2, 6):  # 3 chunks per side, or 1 (the synchronized chunk is then a frozen one's)
        ddp, calls = _counting_ddp(_Routed())
        GradCache(ddp, lf.contrastive_loss, chunk).step(*batches(rank, 0))
        got = {k.removeprefix("module."): p.grad for k, p in ddp.named_parameters() if p.grad is not None}
        _assert_grads(got, want_grads(_Routed, plain, 0))
        assert calls[0] >= 1, calls[0]

    teacher = _mlp().requires_grad_(False)
    ddp, calls = _counting_ddp(_mlp())
    gc = GradCache(lambda b: ddp(b["x"]), lf.contrastive_loss, 2, doc_encoder=lambda b: teacher(b["x"]),
                   sync_module=ddp)
    gc.step(*batches(rank, 0))
    ref_want = {}
    for r in range(WORLD):
        ref = _mlp()
        q, d = batches(r, 0)
        lf.contrastive_loss(ref(q["x"]), teacher(d["x"])).backward()
        for k, p in ref.named_parameters():
            ref_want[k] = ref_want.get(k, 0) + p.grad / WORLD
    _assert_grads({k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}, ref_want)
    assert calls[0] == 1, calls[0]

    for mode in ("step", "forward"):
        model = _WithTemperature()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for step in range(2):
            def make(model=model):
                ref = _WithTemperature()
                ref.load_state_dict(model.state_dict())
                return ref

            want = want_grads(make, lambda m, q, d: m.crit(q, d), step)
            model.zero_grad(set_to_none=True)
            gc = GradCache(ddp, model.crit, 2)
            if mode == "step":
                gc.step(*batches(rank, step))
            else:
                gc(*batches(rank, step)).backward()
            _assert_grads({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, want)


def _check_st_loss(rank: int, model_dir: str):
    from tiny_models import corpus, make_st_model

    from llmembed_fast.integrations.st_losses import CachedFusedMNRLoss

    texts = corpus(3 * sum(UNEVEN_TRIPLETS), seed=3)
    start, b = 3 * sum(UNEVEN_TRIPLETS[:rank]), UNEVEN_TRIPLETS[rank]
    ref = make_st_model(model_dir, "mean", normalize=False).eval()  # no dropout: ranks need no common RNG
    columns = [sum((texts[3 * sum(UNEVEN_TRIPLETS[:r]) + j * n:3 * sum(UNEVEN_TRIPLETS[:r]) + (j + 1) * n]
                    for r, n in enumerate(UNEVEN_TRIPLETS)), []) for j in range(3)]
    loss_ref = CachedFusedMNRLoss(ref, mini_batch_size=2)([dict(ref.tokenize(c)) for c in columns], None)
    loss_ref.backward()
    want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}

    model = make_st_model(model_dir, "mean", normalize=False).eval()
    ddp, calls = _counting_ddp(model, find_unused_parameters=True)
    loss_obj = CachedFusedMNRLoss(model, mini_batch_size=2, gather_across_devices=True)
    loss_obj.model = ddp  # what SentenceTransformerTrainer does (override_model_in_loss)
    local = [texts[start + j * b:start + (j + 1) * b] for j in range(3)]
    loss = loss_obj([dict(model.tokenize(c)) for c in local], None)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=0)
    _assert_grads({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, want)
    assert calls[0] == 1, calls[0]


def _check_fsdp_chunk_counts(rank: int):
    """FSDP gathers parameters in every forward: ranks with different chunk counts get a ValueError on every
    rank instead of waiting on each other for good; equal counts run."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import llmembed_fast as lf

    torch.manual_seed(0)
    model = FSDP(_mlp(), device_id=torch.device("cpu"), use_orig_params=True)
    gcache = lf.GradCache(model, lf.contrastive_loss, 2, grad_multiplier=WORLD)
    gen = torch.Generator().manual_seed(rank)
    for n, uneven in ((4, False), (2 + 4 * rank, True)):
        x, y = torch.randn(n, 12, generator=gen), torch.randn(n, 12, generator=gen)
        if uneven:
            with pytest.raises(ValueError, match="every rank must embed as many chunks"):
                gcache.step(x, y, group=dist.group.WORLD)
        else:
            assert torch.isfinite(gcache.step(x, y, group=dist.group.WORLD))


@contextlib.contextmanager
def _counting_reductions():
    """Counts the reduce-type collectives (reduce-scatter, all-reduce) issued inside the block."""
    calls = [0]
    names = [n for n in ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}

    def wrap(fn):
        def counted(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)
        return counted

    for n in names:
        setattr(dist, n, wrap(saved[n]))
    try:
        yield calls
    finally:
        for n in names:
            setattr(dist, n, saved[n])


def _check_fsdp2(rank: int):
    """FSDP2 (fully_shard): the gradients of the global batch, as many reduce collectives per cached step
    as one uncached backward (every chunk's backward but the last runs with gradient sync off), a user's
    own set_requires_gradient_sync(False) left in force, and unequal chunk counts refused on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import llmembed_fast as lf

    gen = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(WORLD, 7, 12, generator=gen), torch.randn(WORLD, 9, 12, generator=gen)
    labels = torch.arange(7)
    ref = _mlp()
    glob = torch.cat([labels + r * 9 for r in range(WORLD)])
    lf.contrastive_loss(ref(xs.reshape(-1, 12)), ref(ys.reshape(-1, 12)), labels=glob).backward()

    model = _mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    gcache = lf.GradCache(model, lf.contrastive_loss, 3, grad_multiplier=WORLD)
    with _counting_reductions() as cached:
        gcache.step(xs[rank], ys[rank], labels=labels, group=dist.group.WORLD)
    for (name, p), pr in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), pr.grad, rtol=1e-5, atol=1e-6, msg=name)
    model.zero_grad()
    with _counting_reductions() as uncached:
        loss = lf.contrastive_loss(model(xs[rank]), model(ys[rank]), labels=labels, group=dist.group.WORLD)
        loss.backward()
    assert cached[0] == uncached[0] >= 1, (cached[0], uncached[0])
    model.zero_grad()
    model.set_requires_gradient_sync(False)  # the caller's own accumulation over several steps
    with _counting_reductions() as off:
        gcache.step(xs[rank], ys[rank], labels=labels)  # local negatives: the loss itself reduces nothing
    assert off[0] == 0, off[0]
    model.set_requires_gradient_sync(True)
    with pytest.raises(ValueError, match="every rank must embed as many chunks"):
        gcache.step(xs[rank, : 3 + 3 * rank], ys[rank, : 3 + 3 * rank], group=dist.group.WORLD)


def _uneven_worker(rank: int, init_file: str, tmp: str, model_dir: str):
    import datetime
    import warnings

    os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # a short timeout: a rank left waiting in an all-reduce the other never joins fails instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _check_wrapped_encoders(rank, tmp)
        _check_two_ddp_towers(rank)
        _check_frozen_routes_and_loss_leaves(rank)
        _check_st_loss(rank, model_dir)
        _check_fsdp_chunk_counts(rank)
        _check_fsdp2(rank)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_encoders_uneven_batches(tmp_path):
    """GradCache(sync_module=), GradCacheTrainer(encode=) and CachedFusedMNRLoss with a DDP model in the
    loss, local batches of different sizes (different chunk counts): one all-reduce per step, the
    single-process gradients of the global batch; the same with a DDP query model and a DDP document
    model. Frozen routes and loss parameters under DDP. Then FSDP's and FSDP2's chunk-count checks, and
    FSDP2's gradients and synchronization count."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("sentence_transformers")
    from tiny_models import cached_tiny_model_dir

    model_dir = cached_tiny_model_dir("bert")
    mp.spawn(_uneven_worker, args=(str(tmp_path / "init"), str(tmp_path), model_dir), nprocs=WORLD,
             join=True)
