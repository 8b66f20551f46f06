"""Late chunking: one forward over the text, chunk embeddings = pooled token states of each chunk."""

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model

import llmembed_fast as lf
from llmembed_fast.embedder.late_chunking import chunk_spans

TEXT = (
    "the cat sat on the river bank\nmoney and finance for the city\nwater tree house\nsearch model embedding"
)
LINES = TEXT.split("\n")


@pytest.fixture(autouse=True)
def _torch_head(monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")


def _line_token_bounds(tok, text, lines):
    """Token [start, end) of each line by counting prefix tokens (exact here: lines end at '\\n')."""
    full = tok(text)["input_ids"]
    bounds, pos = [], 0
    for line in lines:
        a = text.index(line, pos)
        b = a + len(line)
        pos = b
        na, nb = (len(tok(text[:c])["input_ids"]) for c in (a, b))
        assert full[:nb] == tok(text[:b])["input_ids"]
        bounds.append((na, nb))
    return full, bounds


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_late_chunks_match_pooled_full_forward(arch):
    model, tok = build_tiny_model(arch)
    emb = lf.LLMEmbedder(model, tok, pooling="last", normalize=False, add_eos=False)
    full, bounds = _line_token_bounds(tok, TEXT, LINES)
    with torch.no_grad():
        h = model(input_ids=torch.tensor([full])).last_hidden_state[0]
    want = torch.stack([h[a:b].mean(0) for a, b in bounds])
    for chunks in (LINES, [(TEXT.index(x), TEXT.index(x) + len(x)) for x in LINES], lambda t: t.split("\n")):
        got = emb.encode_late_chunks(TEXT, chunks, output="torch")
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    normed = lf.LLMEmbedder(model, tok, add_eos=False).encode_late_chunks(
        TEXT, LINES, output="torch", dims=16
    )
    torch.testing.assert_close(normed, torch.nn.functional.normalize(want[:, :16], dim=-1), atol=2e-6, rtol=0)
    # context matters: the second line embedded alone differs from its late-chunked embedding
    alone = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, add_eos=False).encode(
        LINES[1], output="torch"
    )
    assert not torch.allclose(alone, want[1], atol=1e-3)


def test_late_chunks_windows_when_text_exceeds_max_length():
    model, tok = build_tiny_model("qwen2")
    W = 7
    emb = lf.LLMEmbedder(model, tok, normalize=False, add_eos=False, max_length=W)
    full, bounds = _line_token_bounds(tok, TEXT, LINES)
    assert len(full) > 2 * W
    with torch.no_grad():
        h = torch.cat(
            [
                model(input_ids=torch.tensor([full[i : i + W]])).last_hidden_state[0]
                for i in range(0, len(full), W)
            ]
        )
    want = torch.stack([h[a:b].mean(0) for a, b in bounds])
    torch.testing.assert_close(emb.encode_late_chunks(TEXT, LINES, output="torch"), want, atol=2e-6, rtol=0)


def test_chunk_spans_errors():
    assert chunk_spans("a b a", ["a", "a"]) == [(0, 1), (4, 5)]
    with pytest.raises(ValueError, match="not found"):
        chunk_spans("abc", ["x"])
    with pytest.raises(ValueError, match="chunks\\[0\\]"):
        chunk_spans("abc", [(2, 9)])
    with pytest.raises(TypeError, match="chunks"):
        chunk_spans("abc", [])
    with pytest.raises(TypeError, match="chunks"):
        chunk_spans("abc", "abc")
    model, tok = build_tiny_model("qwen2")
    out = lf.LLMEmbedder(model, tok).encode_late_chunks("abc def", [(0, 3), (3, 3)])
    assert out.shape == (2, 64) and np.isfinite(out).all()


def test_late_chunks_lowercase_moves_spans_when_lengths_change():
    """sentence-transformers' do_lower_case: 'İ'.lower() is two characters, so chunk spans given on the
    original text must move with the lower-cased text."""
    model, tok = build_tiny_model("qwen2")
    text, chunk = "İİİİ the cat sat on the river bank", "river bank"
    emb = lf.LLMEmbedder(model, tok, lowercase=True, normalize=False, add_eos=False)
    got = emb.encode_late_chunks(text, [chunk, (0, 2)], output="torch")
    low = text.lower()
    assert len(low) != len(text)
    enc = tok(low, return_offsets_mapping=True)
    with torch.no_grad():
        h = model(input_ids=torch.tensor([enc["input_ids"]])).last_hidden_state[0]
    for row, (a, b) in zip(got, [(low.index(chunk), low.index(chunk) + len(chunk)), (0, 4)], strict=True):
        sel = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > a and s < b]
        torch.testing.assert_close(row, h[sel].mean(0), atol=2e-6, rtol=0)


def test_torch_outputs_are_normal_tensors():
    """encode / encode_late_chunks(output="torch") return normal tensors with or without dims (without dims,
    encode's used to be an inference tensor: no backward through a loss on it, no in-place change)."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    w = torch.ones(1, requires_grad=True)
    for out in (emb.encode(["a b", "c"], output="torch"), emb.encode(["a b", "c"], output="torch", dims=16),
                emb.encode_late_chunks(TEXT, LINES, output="torch")):
        assert not out.is_inference()
        torch.nn.functional.mse_loss(out * w, out.detach() + 1).backward()
        out /= 2


def test_late_chunks_check_arguments_as_encode_does():
    """max_tokens_per_batch and dims are checked as encode checks them (a negative or fractional token
    budget ran; dims=(8, 16) crashed with an AttributeError)."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    for kw, name in ((dict(max_tokens_per_batch=-5), "max_tokens_per_batch"),
                     (dict(max_tokens_per_batch=0.5), "max_tokens_per_batch"),
                     (dict(max_tokens_per_batch=0), "max_tokens_per_batch"),
                     (dict(dims=(8, 16)), "dims"), (dict(dims=True), "dims"), (dict(dims=0), "dims")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            emb.encode("hello world", **kw)
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            emb.encode_late_chunks("hello world", ["hello"], **kw)
    out = emb.encode_late_chunks("hello world", ["hello"], dims=np.int64(8), max_tokens_per_batch=64)
    assert out.shape == (1, 8)


def test_late_chunks_apply_the_default_prompt():
    """A model with a default prompt (a sentence-transformers folder's default_prompt_name) gets it in
    late chunking as in encode: no prompt given = the default one passed (it used to get no prompt)."""
    model, tok = build_tiny_model("llama")
    kw = dict(pooling="mean", include_prompt=False, normalize=False)
    prompts = {"query": "query:\n", "doc": "doc:\n"}
    emb = lf.LLMEmbedder(model, tok, prompts=prompts, default_prompt_name="query", **kw)
    plain = lf.LLMEmbedder(model, tok, **kw)
    got = emb.encode_late_chunks(TEXT, LINES, output="torch")
    want = plain.encode_late_chunks(TEXT, LINES, output="torch", prompt="query:\n")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(got, plain.encode_late_chunks(TEXT, LINES, output="torch"), atol=1e-3)
    # the same resolution as encode: prompt_name, an explicit prompt, and an instruction (no default prompt)
    torch.testing.assert_close(
        emb.encode_late_chunks(TEXT, LINES, output="torch", prompt_name="doc"),
        plain.encode_late_chunks(TEXT, LINES, output="torch", prompt="doc:\n"), atol=0, rtol=0)
    torch.testing.assert_close(
        emb.encode_late_chunks(TEXT, LINES, output="torch", instruction="find it"),
        plain.encode_late_chunks(TEXT, LINES, output="torch", instruction="find it"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="prompt_name"):
        emb.encode_late_chunks(TEXT, LINES, prompt_name="nope")
    # one chunk over the whole text pools the tokens encode pools (llama: BOS excluded, no EOS with mean)
    whole = emb.encode_late_chunks(TEXT, [(0, len(TEXT))], output="torch")[0]
    torch.testing.assert_close(whole, emb.encode(TEXT, output="torch"), atol=2e-6, rtol=0)
