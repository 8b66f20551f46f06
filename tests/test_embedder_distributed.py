"""Distributed encode: 2 gloo processes on CPU give rank 0 the 1-process embeddings, in input order."""

import gc
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import cached_tiny_model_dir

import llmembed_fast as lf

TEXTS = [("the cat sat on the river bank " * (i % 7)) + f"item {i}" for i in range(23)] + ["", "x"]


class _NoConfig(torch.nn.Module):
    """A model whose hidden size the embedder cannot read (no ``config``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**kw)


def _worker(rank, world, init_file, model_dir, out_dir):
    os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    # a file rendezvous (a free TCP port picked in advance can be taken by a concurrent test meanwhile)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        emb = lf.LLMEmbedder.from_pretrained(model_dir, device="cpu", pooling="mean")
        out = emb.encode(TEXTS, distributed=True, max_tokens_per_batch=64, instruction="find")
        # a model without a config (no known width): the ranks agree on the width they found
        bare = lf.LLMEmbedder(_NoConfig(emb.model), emb.tokenizer, pooling="mean", packed=False)
        assert bare.embedding_dim is None
        out_bare = bare.encode(TEXTS[:3], distributed=True)
        # ranks holding different texts: a ValueError on every rank, not swapped rows
        try:
            emb.encode(TEXTS[: 5 + rank], distributed=True)
            mismatch = "no error"
        except ValueError as exc:
            mismatch = str(exc)
        assert "same texts on every rank" in mismatch, mismatch
        # texts that differ only across a NUL (a separator would hash them alike), and different options: the
        # same ValueError, not a silent mix of rows
        for texts, kw in (((["a\x00", "b"], ["a", "\x00b"])[rank], {}),
                          (TEXTS[:4], {"prompt": "query: " if rank else "passage: "}),
                          (TEXTS[:4], {"dims": 8 + 8 * rank})):
            with pytest.raises(ValueError, match="same texts on every rank, with the same options"):
                emb.encode(texts, distributed=True, **kw)
        # an argument refused on one rank only: that rank's own error, the other's names it (both waited
        # in the first collective for good before)
        bad = ["a", None] if rank == 1 else ["a", "b"]
        with pytest.raises((TypeError, ValueError),
                           match=r"texts\[1\] must be a string" if rank == 1 else r"rank\(s\) \[1\] refused"):
            emb.encode(bad, distributed=True)
        # one text for two ranks, and a call that fails on the rank holding it: the other rank (no texts)
        # gets an error too instead of waiting in the gather
        try:
            emb.encode(["only one text"], distributed=True, dims=1000)
            failure = "no error"
        except (ValueError, RuntimeError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        want = "ValueError: dims" if rank == 0 else "RuntimeError: distributed encode failed on rank(s) [0]"
        assert failure.startswith(want), failure
        if rank == 0:
            np.save(os.path.join(out_dir, "rank0.npy"), out)
            np.save(os.path.join(out_dir, "bare.npy"), out_bare)
        else:
            assert out is None and out_bare is None
        # free what the caught errors' tracebacks hold while the group is alive, and let both ranks finish
        # their last collective before teardown: without this, a rank aborted at exit in about 1 run of 8
        # ("terminate called without an active exception"; 0 in 40 runs with it)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    model_dir = cached_tiny_model_dir("qwen2")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), model_dir, str(tmp_path)), nprocs=2, join=True)
    got = np.load(tmp_path / "rank0.npy")
    want = lf.LLMEmbedder.from_pretrained(model_dir, device="cpu", pooling="mean").encode(
        TEXTS, instruction="find"
    )
    assert got.shape == want.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    want_bare = lf.LLMEmbedder.from_pretrained(model_dir, device="cpu", pooling="mean").encode(TEXTS[:3])
    np.testing.assert_allclose(np.load(tmp_path / "bare.npy"), want_bare, atol=2e-6, rtol=0)


def test_distributed_without_process_group_is_a_clear_error():
    emb = lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu")
    with pytest.raises(RuntimeError, match="init_process_group"):
        emb.encode(["x"], distributed=True)
