"""GradCache: parameter gradients equal one uncached forward/backward over the whole batch.

Tiny random Qwen2 / Llama / BERT models (fp32). Without dropout the reference is one forward over the whole
batch; with dropout on, the reference embeds the same chunks in the same order from the same RNG state
with a graph (the only way two runs can draw the same dropout masks), so it checks the RNG replay; a
control shows the gradients differ without the replay.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmembed_fast as lf
from llmembed_fast.training import GradCache

B, N, L, VOCAB = 10, 13, 12, 100

pytestmark = pytest.mark.usefixtures("torch_backend")  # the ops' CPU path


def info_nce(q, d, labels=None, temperature=0.05):
    """Plain InfoNCE with cosine similarity: d holds the B positives (rows 0..B-1) then hard negatives."""
    labels = torch.arange(q.shape[0], device=q.device) if labels is None else labels
    s = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T / temperature
    return F.cross_entropy(s, labels)


def make_model(arch: str, dropout: float):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, attention_dropout=dropout, **common)
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, attention_dropout=dropout, **common)
    else:
        cfg = tf.BertConfig(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common)
    cfg.pad_token_id = 0
    torch.manual_seed(1)
    return tf.AutoModel.from_config(cfg, attn_implementation="eager")


class Encoder(nn.Module):
    """HF model -> masked mean pooling -> dropout (so dropout is on even where the model has none)."""

    def __init__(self, model, dropout: float):
        super().__init__()
        self.model, self.drop = model, nn.Dropout(dropout)

    def forward(self, batch):
        h = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.drop(lf.pool(h, batch["attention_mask"], "mean"))


def make_batch(n: int, seed: int, full: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, L), generator=g)
    lengths = torch.full((n,), L) if full else torch.randint(2, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def grads_of(module) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-5):
    assert got.keys() == want.keys() and len(want) > 0
    scale = max(w.abs().max().item() for w in want.values())  # some grads are exactly 0 (BERT key bias)
    for k in want:
        g, w = got[k], want[k]
        assert torch.isfinite(g).all(), k
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m, k=k: f"{k}: {m}")


def reference_chunked(enc, qb, db, chunk, loss_fn, seed, **kw):
    """Forward with a graph over the same chunks in the same order (same RNG draws), one backward."""
    torch.manual_seed(seed)
    q = torch.cat([enc({k: v[i:i + chunk] for k, v in qb.items()}) for i in range(0, B, chunk)])
    d = torch.cat([enc({k: v[i:i + chunk] for k, v in db.items()}) for i in range(0, N, chunk)])
    loss = loss_fn(q, d, **kw)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "bert"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_matches_whole_batch(arch, chunk):
    enc = Encoder(make_model(arch, 0.0), 0.0).train()
    qb, db = make_batch(B, 1), make_batch(N, 2)
    loss_ref = info_nce(enc(qb), enc(db))
    loss_ref.backward()
    want = grads_of(enc)
    loss = GradCache(enc, info_nce, chunk).step(qb, db)
    assert loss.shape == () and not loss.requires_grad
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
@pytest.mark.parametrize("chunk", [3, 4])
def test_dropout_rng_replay(arch, chunk):
    enc = Encoder(make_model(arch, 0.1), 0.1).train()
    qb, db = make_batch(B, 3), make_batch(N, 4)
    loss_ref = reference_chunked(enc, qb, db, chunk, info_nce, seed=7)
    after_ref = torch.rand(4)
    want = grads_of(enc)
    torch.manual_seed(7)
    loss = GradCache(enc, info_nce, chunk, trim_padding=False).step(qb, db)
    # the generators are left as after the first pass (as after one forward)
    torch.testing.assert_close(torch.rand(4), after_ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)
    # control: without the replay the re-run draws other dropout masks and the gradients differ
    torch.manual_seed(7)
    GradCache(enc, info_nce, chunk, trim_padding=False, replay_rng=False).step(qb, db)
    bad = grads_of(enc)
    worst = max(((bad[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    assert worst > 1e-2
    # the module form (forward + backward) replays the same way, and honours replay_rng=False too
    for replay, close in ((True, True), (False, False)):
        torch.manual_seed(7)
        GradCache(enc, info_nce, chunk, trim_padding=False, replay_rng=replay)(qb, db).backward()
        got = grads_of(enc)
        worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
        assert (worst < 1e-4) if close else (worst > 1e-2), (replay, worst)


def test_gradient_checkpointing_with_dropout():
    model = make_model("llama", 0.1)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enc = Encoder(model, 0.1).train()
    qb, db = make_batch(B, 5), make_batch(N, 6)
    loss_ref = reference_chunked(enc, qb, db, 4, info_nce, seed=11)
    want = grads_of(enc)
    torch.manual_seed(11)
    loss = GradCache(enc, info_nce, 4, trim_padding=False).step(qb, db)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)


def test_embed_documents_runs_the_doc_encoder():
    torch.manual_seed(0)
    qenc, denc = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(7, 6)
    gc = GradCache(qenc, info_nce, 3, doc_encoder=denc, doc_chunk_size=2)
    with torch.no_grad():
        torch.testing.assert_close(gc.embed(x, doc=True), denc(x))
        torch.testing.assert_close(gc.embed(x), qenc(x))


def test_separate_doc_encoder_and_hard_negative_labels():
    qenc = Encoder(make_model("qwen2", 0.0), 0.0)
    denc = Encoder(make_model("bert", 0.0), 0.0)
    qb, db = make_batch(B, 8), make_batch(N, 9)
    labels = torch.randperm(N)[:B]
    info_nce(qenc(qb), denc(db), labels=labels, temperature=0.1).backward()
    want_q, want_d = grads_of(qenc), grads_of(denc)
    GradCache(qenc, info_nce, 3, doc_encoder=denc, doc_chunk_size=5).step(qb, db, labels=labels,
                                                                          temperature=0.1)
    assert_grads_close(grads_of(qenc), want_q)
    assert_grads_close(grads_of(denc), want_d)


@pytest.mark.parametrize("reuse", [False, True])
def test_frozen_tower_is_not_replayed(reuse):
    """A frozen document tower (a teacher: an nn.Module whose parameters are all frozen) is not run again in
    the second pass; a function's chunks are, each (only running one shows whether it has a graph). The
    trainable tower's gradients are the same either way."""
    torch.manual_seed(0)
    qenc = nn.Linear(6, 4)
    calls = {"d": 0}

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4).requires_grad_(False)

        def forward(self, x):
            calls["d"] += 1
            return self.lin(x)

    teacher = Teacher()
    xq, xd = torch.randn(4, 6), torch.randn(8, 6)
    lf.contrastive_loss(qenc(xq), teacher(xd)).backward()
    want = grads_of(qenc)
    for denc, replays in ((teacher, 0), (lambda x: teacher(x), 4)):
        qenc.zero_grad()
        calls["d"] = 0
        GradCache(qenc, lf.contrastive_loss, 2, doc_encoder=denc, reuse_last_chunk=reuse).step(xq, xd)
        assert_grads_close(grads_of(qenc), want)
        assert calls["d"] == 4 + replays  # 4 chunks in the first pass


def test_chunks_routed_to_a_frozen_module_skip_only_themselves():
    """A column whose first chunk goes to a frozen module and the later ones to a trainable one (a Router
    over mixed modalities): only the graphless chunk is skipped (after it, the whole tower was)."""
    torch.manual_seed(0)
    frozen, tower = nn.Linear(8, 4).requires_grad_(False), nn.Linear(8, 4)

    def enc(b):
        return frozen(b["x"]) if bool(b["frozen"].all()) else tower(b["x"])

    q = {"x": torch.randn(6, 8), "frozen": torch.tensor([1, 1, 0, 0, 0, 0])}
    d = {"x": torch.randn(6, 8), "frozen": torch.zeros(6, dtype=torch.long)}
    qe = torch.cat([enc({k: v[i:i + 2] for k, v in q.items()}) for i in range(0, 6, 2)])
    lf.contrastive_loss(qe, tower(d["x"])).backward()
    want = grads_of(tower)
    for reuse in (False, True):
        tower.zero_grad()
        GradCache(enc, lf.contrastive_loss, 2, reuse_last_chunk=reuse).step(q, d)
        assert_grads_close(grads_of(tower), want)


def test_one_encoder_routing_a_frozen_and_a_trainable_side():
    """One encoder whose queries go through a frozen module and documents through a trainable one (a
    sentence-transformers Router): the frozen side's skipped replays must not skip the trainable side's."""
    torch.manual_seed(0)
    frozen, tower = nn.Linear(8, 4).requires_grad_(False), nn.Linear(8, 4)

    def enc(batch):
        return frozen(batch["x"]) if batch["task"] == "query" else tower(batch["x"])

    q, d = torch.randn(6, 8), torch.randn(6, 8)
    lf.contrastive_loss(frozen(q), tower(d), temperature=0.1).backward()
    want = grads_of(tower)
    tower.zero_grad()
    GradCache(enc, lf.contrastive_loss, 2).step({"x": q, "task": "query"}, {"x": d, "task": "document"},
                                               temperature=0.1)
    assert_grads_close(grads_of(tower), want)


def test_tensor_batches_and_fused_loss():
    """Plain tensor batches and lf.contrastive_loss (Matryoshka dims, symmetric) as loss_fn."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Dropout(0.2), nn.Linear(48, 32)).train()
    xq, xd = torch.randn(B, 24), torch.randn(N, 24)
    kw = dict(matryoshka_dims=(8, 32), symmetric=True, temperature=0.07)
    torch.manual_seed(3)
    ref = lf.contrastive_loss(torch.cat([enc(xq[i:i + 4]) for i in range(0, B, 4)]),
                              torch.cat([enc(xd[i:i + 4]) for i in range(0, N, 4)]), **kw)
    ref.backward()
    want = grads_of(enc)
    torch.manual_seed(3)
    loss = GradCache(enc, lf.contrastive_loss, 4).step(xq, xd, **kw)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)


def test_forward_mode_backward_scales():
    """forward(): the framework calls backward; the gradient reaching the loss scales the parameters'."""
    enc = Encoder(make_model("qwen2", 0.1), 0.1).train()
    qb, db = make_batch(B, 12), make_batch(N, 13)
    gc = GradCache(enc, info_nce, 4)
    torch.manual_seed(5)
    gc.step(qb, db)
    want = grads_of(enc)
    torch.manual_seed(5)
    loss = gc(qb, db)
    assert loss.requires_grad
    (loss * 3.0).backward()
    assert_grads_close({k: v / 3.0 for k, v in grads_of(enc).items()}, want)
    with pytest.raises(RuntimeError, match="twice"):
        loss2 = gc(qb, db)
        loss2.backward(retain_graph=True)
        loss2.backward()
    enc.zero_grad()
    with torch.no_grad():  # evaluation: just the loss
        assert not gc(qb, db).requires_grad


def test_autocast_bf16():
    enc = Encoder(make_model("qwen2", 0.1), 0.1).train()
    qb, db = make_batch(B, 14), make_batch(N, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = reference_chunked(enc, qb, db, 4, info_nce, 21)
        want = grads_of(enc)
        torch.manual_seed(21)
        loss = GradCache(enc, info_nce, 4, trim_padding=False).step(qb, db)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    got = grads_of(enc)
    for k in want:  # the reference sums chunks' weight grads in bf16 (autocast's cast cache), we in fp32
        assert ((got[k] - want[k]).norm() / want[k].norm()).item() < 2e-2, k
    # forward mode: the re-run inside backward (outside the autocast block) re-enters autocast
    torch.manual_seed(21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = GradCache(enc, info_nce, 4, trim_padding=False)(qb, db)
    loss2.backward()
    got2 = grads_of(enc)
    for k in want:
        assert ((got2[k] - got[k]).norm() / got[k].norm()).item() < 1e-5, k


def test_grad_scaler_fp16():
    enc = Encoder(make_model("bert", 0.1), 0.1).train()
    qb, db = make_batch(B, 16), make_batch(N, 17)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(2)
        q = torch.cat([enc({k: v[i:i + 5] for k, v in qb.items()}) for i in range(0, B, 5)])
        d = torch.cat([enc({k: v[i:i + 5] for k, v in db.items()}) for i in range(0, N, 5)])
        scaler.scale(info_nce(q, d)).backward()
        want = grads_of(enc)
        torch.manual_seed(2)
        GradCache(enc, info_nce, 5, scaler=scaler, trim_padding=False).step(qb, db)
    got = grads_of(enc)
    scale = scaler.get_scale()
    assert scale == 2.0 ** 12
    ratio = [((got[k] - want[k]).norm() / want[k].norm()).item() for k in want]
    assert max(ratio) < 2e-2
    assert sum(g.norm().item() for g in got.values()) > 100.0  # scaled: unscaled grads are O(1)


def test_peak_activations_do_not_grow_with_batch():
    """Saved activations alive at once are one chunk's, whatever the batch size."""
    enc = Encoder(make_model("qwen2", 0.0), 0.0)
    live, peak = [0], [0]

    class Held:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    def counted(batch):
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            return enc(batch)

    peaks = []
    for n in (8, 48):
        peak[0] = 0
        GradCache(counted, info_nce, 4).step(make_batch(n, 1, full=True), make_batch(n, 2, full=True))
        peaks.append(peak[0])
    assert peaks[0] > 0 and peaks[0] == peaks[1]


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_input():
    enc = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="chunk_size"):
            GradCache(enc, info_nce, bad)
    for bad in (2.5, True, None):
        with pytest.raises(TypeError, match="chunk_size"):
            GradCache(enc, info_nce, bad)
    with pytest.raises(ValueError, match="doc_chunk_size"):
        GradCache(enc, info_nce, 2, doc_chunk_size=0)
    import numpy as np

    assert GradCache(enc, info_nce, np.int64(4)).chunk_size == 4  # numpy integers are integers
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="grad_multiplier must be finite"):
            GradCache(enc, info_nce, 2, grad_multiplier=bad)
    with pytest.raises(TypeError, match="encoder"):
        GradCache("model", info_nce, 2)
    with pytest.raises(TypeError, match="loss_fn"):
        GradCache(enc, None, 2)
    gc = GradCache(enc, info_nce, 2)
    for n_doc in (3, 4):  # N < B, also by one row
        with pytest.raises(ValueError, match=f"doc_batch has {n_doc} rows but query_batch has 5"):
            gc.step(x, torch.randn(n_doc, 6))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        gc.step({"a": x, "b": torch.randn(4, 6)}, x)
    with pytest.raises(TypeError, match="query_batch"):
        gc.step([1, 2, 3], x)
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        GradCache(lambda c: enc(c)[:1], info_nce, 2).step(x, x)
    with pytest.raises(ValueError, match=r"\[b, D\]"):
        GradCache(lambda c: enc(c).sum(-1), info_nce, 2).step(x, x)
    with pytest.raises(TypeError, match="tensor of embeddings"):
        GradCache(lambda c: {"emb": enc(c)}, info_nce, 2).step(x, x)
    with pytest.raises(ValueError, match="scalar"):
        GradCache(enc, lambda q, d: (q * d).sum(-1), 2).step(x, x)
    with pytest.raises(ValueError, match="does not depend"):
        GradCache(enc, lambda q, d: torch.tensor(1.0), 2).step(x, x)


def test_doc_batch_as_list_of_columns():
    """Positives and hard negatives as separately padded batches, concatenated in order (each column's
    rows sorted by length or not)."""
    enc = Encoder(make_model("llama", 0.0), 0.0)
    qb, pos, neg = make_batch(B, 30), make_batch(B, 31), make_batch(4, 32)
    info_nce(enc(qb), torch.cat([enc(pos), enc(neg)])).backward()
    want = grads_of(enc)
    for sort in (True, False):
        GradCache(enc, info_nce, 3, sort_by_length=sort).step(qb, [pos, neg])
        assert_grads_close(grads_of(enc), want)
    with pytest.raises(ValueError, match="empty"):
        GradCache(enc, info_nce, 3).step(qb, [])


# ---------------------------------------------------------------------------------------------------
# reuse_last_chunk: the step's last chunk keeps its graph from the first pass
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_last_chunk(reuse):
    """The last document chunk runs once, with a graph, in the first pass; every other chunk twice. Same
    loss and gradients either way, dropout on (the other chunks' RNG replay still lines up)."""
    enc = Encoder(make_model("qwen2", 0.1), 0.1).train()
    calls = []

    def counted(batch):
        calls.append((batch["input_ids"].shape[0], torch.is_grad_enabled()))
        return enc(batch)

    qb, db = make_batch(B, 40), make_batch(N, 41)
    loss_ref = reference_chunked(enc, qb, db, 4, info_nce, seed=17)
    want = grads_of(enc)
    torch.manual_seed(17)
    loss = GradCache(counted, info_nce, 4, trim_padding=False, reuse_last_chunk=reuse).step(qb, db)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)
    n_chunks = -(-B // 4) + -(-N // 4)
    assert len(calls) == 2 * n_chunks - int(reuse)
    assert [g for _, g in calls[:n_chunks]] == [False] * (n_chunks - 1) + [reuse]
    assert calls[n_chunks - 1][0] == N % 4  # the kept chunk is the documents' last (the remainder)


def test_reuse_last_chunk_not_for_no_sync_encoders():
    """An encoder with no_sync() (DDP, FSDP) decides gradient synchronization at forward time: every chunk
    is re-run, each backward but the last under no_sync()."""

    class SyncAware(Encoder):
        entered = 0

        @contextlib.contextmanager
        def no_sync(self):
            SyncAware.entered += 1
            yield

    enc = SyncAware(make_model("llama", 0.0), 0.0)
    grad_modes = []
    enc.register_forward_pre_hook(lambda m, args: grad_modes.append(torch.is_grad_enabled()))
    qb, db = make_batch(B, 42), make_batch(N, 43)
    info_nce(enc(qb), enc(db)).backward()
    want = grads_of(enc)
    grad_modes.clear()
    GradCache(enc, info_nce, 4).step(qb, db)
    assert_grads_close(grads_of(enc), want)
    n_chunks = -(-B // 4) + -(-N // 4)
    assert grad_modes == [False] * n_chunks + [True] * n_chunks
    assert SyncAware.entered == n_chunks - 1


# ---------------------------------------------------------------------------------------------------
# sync_module, the loss's own parameters, autocast, batch slicing, empty batches
# ---------------------------------------------------------------------------------------------------

class _SyncAware(nn.Module):
    """A stand-in for a DDP module: counts no_sync() entries and the grad mode of its forwards."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.entered, self.grad_modes = enc, 0, []

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.enc(x)


def test_synchronized_chunk_is_the_trainable_towers_last():
    """Queries through a frozen module, documents through a DDP-like one: the synchronized backward is the
    documents' last chunk, run once with its gradient; a graphless query chunk last would need one more
    document chunk re-run with a zero gradient to synchronize."""
    torch.manual_seed(0)
    frozen, tower = nn.Linear(8, 4).requires_grad_(False), nn.Linear(8, 4)
    ddp = _SyncAware(tower)

    def enc(b):
        return frozen(b["x"]) if b["task"] == "query" else ddp(b["x"])

    q, d = torch.randn(6, 8), torch.randn(6, 8)
    lf.contrastive_loss(frozen(q), tower(d)).backward()
    want = grads_of(tower)
    tower.zero_grad()
    ddp.grad_modes.clear()
    GradCache(enc, lf.contrastive_loss, 2, sync_module=ddp).step({"x": q, "task": "query"},
                                                                 {"x": d, "task": "document"})
    assert_grads_close(grads_of(tower), want)
    assert ddp.grad_modes == [False] * 3 + [True] * 3  # 3 document chunks, each re-run once
    assert ddp.entered == 5  # every backward but the synchronized one under no_sync


def _mlp(seed: int = 0, din: int = 12, dout: int = 16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, 24), nn.GELU(), nn.Linear(24, dout))


@pytest.mark.parametrize("mode", ["step", "forward"])
def test_sync_module_governs_a_wrapped_encoder(mode):
    """An encoder calling the DDP module (a lambda, a bound method) is synchronized by ``sync_module``:
    every chunk but the step's last under its no_sync(), and no reuse_last_chunk (decided at forward)."""
    ddp = _SyncAware(_mlp())
    xq, xd = torch.randn(5, 12), torch.randn(7, 12)
    lf.contrastive_loss(ddp(xq), ddp(xd)).backward()
    want = grads_of(ddp)
    ddp.grad_modes.clear()
    gc = GradCache(lambda x: ddp(x), lf.contrastive_loss, 2, sync_module=ddp)
    if mode == "step":
        gc.step(xq, xd)
    else:
        gc(xq, xd).backward()
    assert_grads_close(grads_of(ddp), want)
    n_chunks = 3 + 4
    assert ddp.grad_modes == [False] * n_chunks + [True] * n_chunks  # every chunk re-run: no reuse
    assert ddp.entered == n_chunks - 1
    with pytest.raises(TypeError, match="sync_module"):
        GradCache(ddp, lf.contrastive_loss, 2, sync_module=nn.Linear(2, 2))


@pytest.mark.parametrize("multiplier", [1.0, 3.0])
def test_loss_parameters_get_gradients(multiplier):
    """A learnable temperature inside the loss gets its gradient once, scaled by grad_multiplier like the
    encoder's, in step() and forward(); the returned loss is unscaled."""
    enc = _mlp()
    xq, xd = torch.randn(6, 12), torch.randn(12, 12)
    t = torch.tensor(0.07, requires_grad=True)
    loss_ref = lf.contrastive_loss(enc(xq), enc(xd), temperature=t)
    loss_ref.backward()
    want, want_t = grads_of(enc), t.grad.clone()
    want = {k: v * multiplier for k, v in want.items()}
    for mode in ("step", "forward"):
        t.grad = None
        gc = GradCache(enc, lf.contrastive_loss, 4, grad_multiplier=multiplier)
        if mode == "step":
            loss = gc.step(xq, xd, temperature=t)
        else:
            loss = gc(xq, xd, temperature=t)
            loss.backward()
        torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=0)
        assert_grads_close(grads_of(enc), want)
        assert t.grad is not None, mode
        torch.testing.assert_close(t.grad, want_t * multiplier, rtol=1e-5, atol=0, msg=mode)
    crit = lf.ContrastiveLoss(temperature=0.07, learn_temperature=True)
    GradCache(enc, crit, 4).step(xq, xd)
    params = list(crit.parameters())
    assert params and all(p.grad is not None and p.grad.abs().item() > 0 for p in params)


class _PyMatmulLoss(torch.autograd.Function):
    """A generic loss with a Python backward: its matmul follows whatever autocast state it runs under."""

    @staticmethod
    def forward(ctx, q, d):
        s = q @ d.T
        ctx.save_for_backward(q, d, s)
        return torch.logsumexp(s, 1).mean() - s.diagonal().mean()

    @staticmethod
    def backward(ctx, g):
        q, d, s = ctx.saved_tensors
        p = torch.softmax(s, 1)
        p = p - torch.eye(*p.shape)
        p = p * (g / q.shape[0])
        return torch.mm(p, d), torch.mm(p.T, q)


def test_autocast_step_and_forward_agree_for_a_generic_loss():
    """Under autocast, step() back-propagates the loss outside autocast, as forward()'s loss.backward()
    in a training loop does: same parameter gradients (the chunks' replay runs under autocast in both)."""
    enc = _mlp()
    xq, xd = torch.randn(6, 12), torch.randn(9, 12)

    def loss_fn(q, d):
        return _PyMatmulLoss.apply(q.float(), d.float())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        GradCache(enc, loss_fn, 4).step(xq, xd)
        g_step = grads_of(enc)
        loss = GradCache(enc, loss_fn, 4)(xq, xd)
    loss.backward()
    g_fwd = grads_of(enc)
    for k in g_fwd:
        torch.testing.assert_close(g_step[k], g_fwd[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def _trim_case(with_x: bool):
    Lx = 6
    enc = _mlp(din=Lx)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, 4, (n,), generator=g)  # every chunk is padded past column 4
        mask = (torch.arange(Lx)[None] < lengths[:, None]).long()
        out = {"attention_mask": mask, "feat": torch.randn(n, Lx, generator=g), "note": "hi",
               "extra": {"bias": torch.randn(n, generator=g), "scale": 2.0}}
        if with_x:
            out["x"] = torch.randn(n, Lx, generator=g)
        return out

    widths = []

    def encoder(b):
        assert b["note"] == "hi" and b["extra"]["scale"] == 2.0
        widths.append(b["attention_mask"].shape[1])
        assert b["feat"].shape[1] == Lx  # not a sequence key: never cut
        h = b["feat"]
        if with_x:  # named in sequence_keys: cut with the mask
            assert b["x"].shape[1] == b["attention_mask"].shape[1]
            h = h + torch.nn.functional.pad(b["x"] * b["attention_mask"], (0, Lx - b["x"].shape[1]))
        return enc(h) + b["extra"]["bias"][:, None]

    qb, db = batch(5, 1), batch(8, 2)
    loss_ref = lf.contrastive_loss(encoder(qb), encoder(db))
    loss_ref.backward()
    want = grads_of(enc)
    widths.clear()
    kw = {"sequence_keys": ("x",)} if with_x else {}
    loss = GradCache(encoder, lf.contrastive_loss, 2, **kw).step(qb, db)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)
    assert widths and all(w < Lx for w in widths)  # trimming did happen


def test_trim_padding_spares_other_tensors_and_splits_nested_dicts():
    """trim_padding cuts the token axis of sequence tensors only, not a per-example feature whose dim 1
    happens to equal the sequence length; nested dicts are split row-wise like the top level."""
    _trim_case(with_x=False)


def test_sequence_keys_are_trimmed():
    _trim_case(with_x=True)
    with pytest.raises(TypeError, match="sequence_keys"):
        GradCache(nn.Linear(2, 2), lf.contrastive_loss, 2, sequence_keys=(1,))


def test_empty_batches_raise_naming_them():
    enc = nn.Linear(6, 4)
    gc = GradCache(enc, info_nce, 2)
    with pytest.raises(ValueError, match="query_batch is empty"):
        gc.step(torch.randn(0, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"doc_batch\[1\] is empty"):
        gc.step(torch.randn(3, 6), [torch.randn(3, 6), torch.randn(0, 6)])
    with pytest.raises(ValueError, match="query_batch is empty"):
        gc(torch.randn(0, 6), torch.randn(0, 6))
    with pytest.raises(ValueError, match="batch is empty"):
        gc.embed(torch.randn(0, 6))


def test_step_under_no_grad_and_inference_mode():
    """step() is a training step: under a caller's no_grad() it still gives the gradients; under
    inference_mode() (whose tensors cannot be saved for backward) it says so."""
    enc = _mlp()
    xq, xd = torch.randn(5, 12), torch.randn(7, 12)
    GradCache(enc, lf.contrastive_loss, 2).step(xq, xd)
    want = grads_of(enc)
    enc.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = GradCache(enc, lf.contrastive_loss, 2).step(xq, xd)
    assert torch.isfinite(loss)
    assert_grads_close(grads_of(enc), want)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        GradCache(enc, lf.contrastive_loss, 2).step(xq, xd)


def test_inputs_that_require_grad_are_refused():
    """A batch made by a trainable upstream module cannot be back-propagated chunk by chunk."""
    enc, up = _mlp(), nn.Linear(12, 12)
    xq, xd = up(torch.randn(5, 12)), torch.randn(7, 12)
    gc = GradCache(enc, lf.contrastive_loss, 2)
    with pytest.raises(ValueError, match="query_batch requires grad"):
        gc.step(xq, xd)
    with pytest.raises(ValueError, match=r"doc_batch\['x'\] requires grad"):
        GradCache(lambda b: enc(b["x"]), lf.contrastive_loss, 2).step({"x": xd}, {"x": up(xd)})


@pytest.mark.parametrize("layout", ["list", "single", "single-none", "neither"])
def test_fsdp2_no_sync_restores_each_group(layout):
    """FSDP2's state keeps its parameter groups as a list (newer torch) or as one optional group (older
    torch): either way no_sync restores each group's own flags afterwards (a user's earlier "no sync" stays),
    and where neither is found, sync is turned back on."""
    from types import SimpleNamespace

    from llmembed_fast.training.grad_cache import no_sync

    class Group:
        def __init__(self, reduce):
            self.reduce_grads = self.all_reduce_grads = reduce

    groups = [Group(False), Group(True)]  # the user had turned sync off for the first group

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            if layout == "list":
                self.state = SimpleNamespace(_fsdp_param_groups=groups)
            elif layout == "single":
                self.state = SimpleNamespace(_fsdp_param_group=groups[0])
            elif layout == "single-none":
                self.state = SimpleNamespace(_fsdp_param_group=None)
            else:
                self.state = SimpleNamespace()
            self.sync_calls = []

        def _get_fsdp_state(self):
            return self.state

        def set_requires_gradient_sync(self, flag):
            self.sync_calls.append(flag)
            for g in groups:
                g.reduce_grads = g.all_reduce_grads = flag

    m = Fake()
    with no_sync(m):
        assert [g.reduce_grads for g in groups] == [False, False]
    if layout == "list":
        assert [(g.reduce_grads, g.all_reduce_grads) for g in groups] == [(False, False), (True, True)]
        assert m.sync_calls == [False]
    elif layout == "single":
        assert groups[0].reduce_grads is False and m.sync_calls == [False]
    elif layout == "single-none":
        assert m.sync_calls == [False]  # no group to restore: nothing else touched
    else:
        assert m.sync_calls == [False, True]
        assert [g.reduce_grads for g in groups] == [True, True]


class _Spy(nn.Module):
    """Records each chunk's input_ids as the encoder sees them."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.seen = enc, []

    def forward(self, batch):
        self.seen.append(batch["input_ids"].clone())
        return self.enc(batch)


def _ends(mask):
    return [int(r.nonzero().max()) + 1 if r.any() else 0 for r in mask]


@pytest.mark.parametrize("chunk", [3, 4])
def test_sort_by_length_chunks_longest_first(chunk):
    """Rows are chunked longest first (each chunk padded to about its own length: fewer tokens run), the
    loss sees them in the caller's order, and the gradients equal the uncached ones; with it off, chunks are
    the rows in order."""
    enc = _Spy(Encoder(make_model("qwen2", 0.0), 0.0)).train()
    qb, db = make_batch(B, 11), make_batch(N, 12)
    loss_ref = info_nce(enc(qb), enc(db))
    loss_ref.backward()
    want = grads_of(enc)
    tokens = {}
    for sort in (True, False):
        enc.seen.clear()
        loss = GradCache(enc, info_nce, chunk, sort_by_length=sort).step(qb, db)
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
        assert_grads_close(grads_of(enc), want)
        first_q = enc.seen[: -(-B // chunk)]  # the first pass's query chunks
        rows = torch.cat([torch.nn.functional.pad(x, (0, L - x.shape[1])) for x in first_q])
        if sort:
            order = sorted(range(B), key=lambda i: -_ends(qb["attention_mask"])[i])
            assert order != list(range(B))  # the test's batch is not sorted already
            torch.testing.assert_close(rows, qb["input_ids"][order], rtol=0, atol=0)
            widths = [x.shape[1] for x in first_q]
            assert widths == sorted(widths, reverse=True)
        else:
            torch.testing.assert_close(rows, qb["input_ids"], rtol=0, atol=0)
        tokens[sort] = sum(x.numel() for x in enc.seen)
    assert tokens[True] < tokens[False]


def test_sort_by_length_with_dropout_replays_the_sorted_chunks():
    """With dropout, the reference embeds the same longest-first chunks from the same RNG state (the
    documents' longest chunk last: the kept one): the replay and the mapping of the cached gradient's rows
    back to the sorted chunks are both exercised."""
    chunk = 4
    enc = Encoder(make_model("bert", 0.1), 0.1).train()
    qb, db = make_batch(B, 13), make_batch(N, 14)

    def sorted_embed(batch, n, longest_last=False):
        order = sorted(range(n), key=lambda i: -_ends(batch["attention_mask"])[i])
        idx = torch.tensor(order)
        starts = list(range(0, n, chunk))
        parts = {}
        for lo in starts[1:] + starts[:1] if longest_last else starts:
            rows = idx[lo:lo + chunk]
            part = {k: v[rows] for k, v in batch.items()}
            w = max(_ends(part["attention_mask"]))
            parts[lo] = enc({k: v[:, :w] for k, v in part.items()})
        out = torch.cat([parts[lo] for lo in starts])
        return out[torch.argsort(idx)]

    torch.manual_seed(5)
    loss_ref = info_nce(sorted_embed(qb, B), sorted_embed(db, N, longest_last=True))
    loss_ref.backward()
    want = grads_of(enc)
    torch.manual_seed(5)
    loss = GradCache(enc, info_nce, chunk).step(qb, db)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)


def test_left_padded_batches_keep_their_order():
    """A left-padded batch (every row ends at the last column) is not reordered."""
    enc = _Spy(Encoder(make_model("llama", 0.0), 0.0)).train()
    qb, db = make_batch(B, 15), make_batch(N, 16)
    for b in (qb, db):
        for k in b:
            b[k] = torch.stack([torch.roll(r, int((b["attention_mask"][i] == 0).sum())) for i, r in
                                enumerate(b[k])])
    assert all(e == L for e in _ends(qb["attention_mask"]))
    GradCache(enc, info_nce, 3).step(qb, db)
    torch.testing.assert_close(torch.cat(enc.seen[:4]), qb["input_ids"], rtol=0, atol=0)


def test_embed_returns_rows_in_the_callers_order():
    """GradCache.embed (evaluation) chunks the rows longest first too, and puts them back in order."""
    enc = Encoder(make_model("qwen2", 0.0), 0.0).eval()
    qb = make_batch(B, 17)
    with torch.no_grad():
        want = enc(qb)
    for sort in (True, False):
        got = GradCache(enc, info_nce, 3, sort_by_length=sort).embed(qb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("rows", [4, 64])  # 64 >= B: only the token budget cuts, the rows are still sorted
def test_chunk_tokens_packs_rows_by_attended_tokens(sort, rows):
    """chunk_tokens: each chunk holds consecutive rows (of the sorted order) while their attended tokens
    fit, at most chunk_size rows, a longer row alone; gradients equal the uncached step's."""
    enc = _Spy(Encoder(make_model("qwen2", 0.0), 0.0)).train()
    qb, db = make_batch(B, 18), make_batch(N, 19)
    loss_ref = info_nce(enc(qb), enc(db))
    loss_ref.backward()
    want = grads_of(enc)
    enc.seen.clear()
    budget = 20
    loss = GradCache(enc, info_nce, rows, chunk_tokens=budget, sort_by_length=sort).step(qb, db)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(enc), want)
    lengths = qb["attention_mask"].sum(1).tolist()
    order = sorted(range(B), key=lambda i: -_ends(qb["attention_mask"])[i]) if sort else list(range(B))
    sizes, lo = [], 0
    while lo < B:  # the packing, written out
        hi, total = lo + 1, lengths[order[lo]]
        while hi < B and hi - lo < rows and total + lengths[order[hi]] <= budget:
            total += lengths[order[hi]]
            hi += 1
        sizes.append(hi - lo)
        lo = hi
    assert [x.shape[0] for x in enc.seen[: len(sizes)]] == sizes and len(set(sizes)) > 1
    first_q = torch.cat([torch.nn.functional.pad(x, (0, L - x.shape[1])) for x in enc.seen[: len(sizes)]])
    torch.testing.assert_close(first_q, qb["input_ids"][order], rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk_tokens needs"):
        GradCache(enc, info_nce, 4, chunk_tokens=8).step(torch.randn(4, 6), torch.randn(4, 6))
    for bad, err in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="chunk_tokens"):
            GradCache(enc, info_nce, 4, chunk_tokens=bad)
