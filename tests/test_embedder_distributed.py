"""Distributed encode: 2 gloo processes on CPU give rank 0 the 1-process embeddings, in input order."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import cached_tiny_model_dir

import llmembed_fast as lf

TEXTS = [("the cat sat on the river bank " * (i % 7)) + f"item {i}" for i in range(23)] + ["", "x"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, model_dir, out_dir):
    os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        emb = lf.LLMEmbedder.from_pretrained(model_dir, device="cpu", pooling="mean")
        out = emb.encode(TEXTS, distributed=True, max_tokens_per_batch=64, instruction="find")
        if rank == 0:
            np.save(os.path.join(out_dir, "rank0.npy"), out)
        else:
            assert out is None
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    model_dir = cached_tiny_model_dir("qwen2")
    mp.spawn(_worker, args=(2, _free_port(), model_dir, str(tmp_path)), nprocs=2, join=True)
    got = np.load(tmp_path / "rank0.npy")
    want = lf.LLMEmbedder.from_pretrained(model_dir, device="cpu", pooling="mean").encode(
        TEXTS, instruction="find"
    )
    assert got.shape == want.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_distributed_without_process_group_is_a_clear_error():
    emb = lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu")
    with pytest.raises(RuntimeError, match="init_process_group"):
        emb.encode(["x"], distributed=True)
