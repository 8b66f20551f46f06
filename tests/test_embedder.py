"""LLMEmbedder on tiny random Qwen2 / Llama / Mistral / GPT-2 / BERT models against independent references:
sentence-transformers on the same weights, and hand-built token sequences run through the bare model."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from st_compat import st_texts, transformers_major, transformers_version
from tiny_models import build_tiny_model, cached_tiny_model_dir, make_qwen3_embedding_tokenizer, make_st_model

import llmembed_fast as lf
from llmembed_fast.embedder.prompts import PROMPT_STYLES

TEXTS = [
    "hello world",
    "the cat sat on the river bank with a dog",
    "",
    "a",
    "Money, finance: 42.",
    "search " * 40,
    "The essence of a sentence",
    "water tree house city music paper model",
]


@pytest.fixture(autouse=True)
def _torch_head(monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")  # the Triton head is covered by test_triton_head


def _cos(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return F.cosine_similarity(a, b, dim=-1)


def _ref_last_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("arch,add_eos", [("qwen2", False), ("llama", False), ("mistral", True)])
def test_last_token_matches_sentence_transformers(tmp_path, arch, add_eos):
    d = cached_tiny_model_dir(arch, add_eos=add_eos)
    st = make_st_model(d, "lasttoken", normalize=True, save_to=str(tmp_path / "st"))
    ref = st.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    emb = lf.LLMEmbedder.from_pretrained(str(tmp_path / "st"))
    assert emb.pooling == "last" and emb.normalize and not emb.add_eos  # read from the ST folder
    # the texts as this ST tokenizes them ("search " * 40 ends in a space that 5.x strips)
    out = emb.encode(st_texts(TEXTS), output="torch", max_tokens_per_batch=64)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_side_batch_size_and_packing_agree(arch, pooling):
    model, tok = build_tiny_model(arch)
    common = dict(pooling=pooling, prompt_style="none")
    base = lf.LLMEmbedder(model, tok, padding_side="right", **common).encode(
        TEXTS, output="torch", batch_size=1
    )
    assert torch.isfinite(base).all()
    nonempty = torch.tensor([bool(t) for t in TEXTS])  # '' has no token at all for Qwen2/GPT-2 without EOS
    torch.testing.assert_close(base.norm(dim=1)[nonempty], torch.ones(int(nonempty.sum())), atol=1e-5, rtol=0)
    for kw in (
        dict(padding_side="left", batch_size=16),
        dict(padding_side="right", batch_size=16),
        dict(padding_side="left", batch_size=3, packed=True),
        dict(padding_side="right", packed=True),
    ):
        bs, packed = kw.pop("batch_size", None), kw.pop("packed", False)
        e = lf.LLMEmbedder(model, tok, packed=packed, **kw, **common)
        out = e.encode(TEXTS, output="torch", batch_size=bs)
        torch.testing.assert_close(out, base, atol=3e-6, rtol=0)
        if packed:  # the packed rows really ran packed (not padded after a failed mask probe)
            # transformers 4's BERT takes a 0/1 [1, T, T] mask; 4.51's GPT-2 neither form (it runs padded)
            want = {"3d"} if arch == "bert" and transformers_major() < 5 else {"4d"}
            if arch == "gpt2" and transformers_version() < (4, 57):
                want = {"4d", None}
            assert e._packed_mask_kind() in want


def test_input_order_restored_and_single_string():
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    one_by_one = np.stack([emb.encode(t) for t in TEXTS])
    all_at_once = emb.encode(TEXTS, max_tokens_per_batch=50)
    assert all_at_once.shape == (len(TEXTS), 64) and one_by_one.shape == all_at_once.shape
    np.testing.assert_allclose(all_at_once, one_by_one, atol=3e-6, rtol=0)


def test_instruction_excluded_from_mean_pooling_exactly():
    model, tok = build_tiny_model("llama")
    emb = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, prompt_style="instruct")
    assert not emb.include_prompt and not emb.add_eos
    instr = "retrieve relevant passage"
    texts = ["the river bank", "money and finance for the city"]
    out = emb.encode(texts, instruction=instr, output="torch")
    for i, text in enumerate(texts):
        full = tok(f"Instruct: {instr}\nQuery: {text}")["input_ids"]
        prefix = tok(f"Instruct: {instr}\nQuery:")["input_ids"]  # the ' ' merges into the text's first token
        assert full[: len(prefix)] == prefix  # the boundary is clean here, so counting prefix tokens is exact
        h = _ref_last_hidden(model, full)
        torch.testing.assert_close(out[i], h[len(prefix) :].mean(0), atol=2e-6, rtol=0)
        assert not torch.allclose(out[i], h.mean(0), atol=1e-3)  # pooling the instruction would differ
    both = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, include_prompt=True)
    h = _ref_last_hidden(model, tok(f"Instruct: {instr}\nQuery: {texts[0]}")["input_ids"])
    torch.testing.assert_close(
        both.encode(texts[:1], instruction=instr, output="torch")[0], h.mean(0), atol=2e-6, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_truncation_keeps_eos_and_template_suffix(arch):
    model, tok = build_tiny_model(arch)
    eos = tok.eos_token_id
    text = " ".join(["model embedding vector search"] * 20)
    # plain last-token embedder: EOS appended after truncation
    emb = lf.LLMEmbedder(model, tok, max_length=9, normalize=False)
    assert emb.pooling == "last" and emb.add_eos
    body = tok(text)["input_ids"]
    ids = body[:8] + [eos]  # BOS (when the tokenizer adds one) and text tokens, then EOS
    torch.testing.assert_close(
        emb.encode(text, output="torch"), _ref_last_hidden(model, ids)[-1], atol=2e-6, rtol=0
    )
    # PromptEOL: no EOS, the template's closing tokens survive truncation
    peol = lf.LLMEmbedder(model, tok, prompt_style="prompteol", max_length=24, normalize=False)
    assert not peol.add_eos and peol.pooling == "last"
    full = tok(f'This sentence : "{text}" means in one word:"')["input_ids"]
    tail = tok('" means in one word:"', add_special_tokens=False)["input_ids"]
    assert full[-len(tail) :] == tail
    head = tok('This sentence : "', add_special_tokens=True)["input_ids"]
    assert full[: len(head)] == head
    ids = full[: 24 - len(tail)] + tail
    torch.testing.assert_close(
        peol.encode(text, output="torch"), _ref_last_hidden(model, ids)[-1], atol=2e-6, rtol=0
    )


def test_echo_pools_second_copy_only():
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok, prompt_style="echo", normalize=False)
    assert emb.pooling == "mean" and not emb.include_prompt
    text = "the cat sat on the river bank"
    first = tok("Rewrite the sentence: " + text + "\nRewritten sentence:")["input_ids"]
    full = tok("Rewrite the sentence: " + text + "\nRewritten sentence: " + text)["input_ids"]
    assert full[: len(first)] == first
    h = _ref_last_hidden(model, full)
    torch.testing.assert_close(emb.encode(text, output="torch"), h[len(first) :].mean(0), atol=2e-6, rtol=0)


def test_forward_has_gradients_and_matches_encode():
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok, pooling="mean", dims=32)
    batch = emb.tokenize(TEXTS[:4], instruction="retrieve relevant passage")
    out = emb(batch)
    assert out.shape == (4, 32) and out.requires_grad
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    enc = emb.encode(TEXTS[:4], instruction="retrieve relevant passage", output="torch")
    torch.testing.assert_close(out.detach(), enc, atol=3e-6, rtol=0)


def test_dims_precision_and_output():
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok, dims=16)
    full = lf.LLMEmbedder(model, tok, normalize=False).encode(TEXTS, output="torch")
    out = emb.encode(TEXTS, output="torch")
    assert out.shape == (len(TEXTS), 16)
    torch.testing.assert_close(out, F.normalize(full[:, :16], dim=-1), atol=2e-6, rtol=0)
    half = emb.encode(TEXTS, precision="float16")
    assert half.dtype == np.float16 and half.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(half.astype(np.float32), out.numpy(), atol=1e-3)


def test_quantized_precision():
    quant = pytest.importorskip("llmembed_fast.quant")
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    f32 = emb.encode(TEXTS, output="torch")
    for precision in ("int8", "uint8", "binary", "ubinary"):
        got = emb.encode(TEXTS, precision=precision, output="torch")
        want = quant.quantize(f32, precision)
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want)), precision


def test_triton_head(monkeypatch):
    """The head through the Triton kernels (interpreter on CPU) gives the torch path's embeddings."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok, pooling="mean")
    ref = emb.encode(TEXTS[:4], output="torch", instruction="find")
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    torch.testing.assert_close(
        emb.encode(TEXTS[:4], output="torch", instruction="find"), ref, atol=2e-6, rtol=0
    )
    torch.testing.assert_close(
        emb.encode(TEXTS[:4], output="torch", instruction="find", packed=True), ref, atol=3e-6, rtol=0
    )


def test_bad_inputs(tmp_path):
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    with pytest.raises(ValueError, match="texts"):
        emb.encode([])  # the contract (sentence-transformers returns an empty array)
    with pytest.raises(ValueError, match="texts"):
        emb.tokenize([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        emb.encode(["ok", 3])
    with pytest.raises(TypeError, match="texts"):
        emb.encode(None)
    with pytest.raises(ValueError, match="precision"):
        emb.encode(["x"], precision="int4")
    with pytest.raises(ValueError, match="output"):
        emb.encode(["x"], output="list")
    with pytest.raises(ValueError, match="batch_size"):
        emb.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="pooling"):
        lf.LLMEmbedder(model, tok, pooling="median")
    with pytest.raises(ValueError, match="prompt_name"):
        emb.encode(["x"], prompt_name="classification")  # "query" / "document": implicit empty prompts
    with pytest.raises(ValueError, match="padding_side"):
        lf.LLMEmbedder(model, tok, padding_side="middle")
    with pytest.raises(ValueError, match="dims"):
        lf.LLMEmbedder(model, tok, dims=1000)
    with pytest.raises(FileNotFoundError, match="path_or_id"):
        lf.LLMEmbedder.from_pretrained(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="path_or_id"):
        lf.LLMEmbedder.from_pretrained("no-such-org/no-such-model-llmembed")
    out = emb.encode(["", "", "x"])  # empty strings encode (EOS only)
    assert out.shape == (3, 64) and np.isfinite(out).all()


def test_gradcache_encoder_gives_uncached_gradients():
    """LLMEmbedder is a GradCache encoder: batches from tokenize() slice by rows; gradients match."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok, pooling="mean")
    q = emb.tokenize(TEXTS[:4], instruction="retrieve relevant passage")
    d = emb.tokenize(TEXTS[4:])
    loss = lf.contrastive_loss(emb(q), emb(d), temperature=0.1)
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cached = lf.GradCache(emb, lambda a, b: lf.contrastive_loss(a, b, temperature=0.1), chunk_size=3).step(
        q, d
    )
    torch.testing.assert_close(cached, loss.detach(), atol=1e-6, rtol=0)
    for g, w in zip((p.grad for p in model.parameters()), want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_packed_block_diagonal_mask_under_eager_attention():
    """The packed row's additive mask also isolates sequences under eager attention (not only sdpa)."""
    model, tok = build_tiny_model("llama", attn_implementation="eager")
    ref = lf.LLMEmbedder(model, tok, pooling="mean").encode(TEXTS, output="torch", batch_size=1)
    got = lf.LLMEmbedder(model, tok, pooling="mean", packed=True).encode(TEXTS, output="torch")
    torch.testing.assert_close(got, ref, atol=3e-6, rtol=0)


class _MaskDropping(torch.nn.Module):
    """A model that ignores any attention mask but a [B, L] padding mask (as a remote-code model may): it
    attends over the whole row (a mask of ones; with no mask, transformers >= 4.53 would find the packed
    sequences from the restarting position_ids itself)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        if attention_mask is not None and attention_mask.dim() > 2:
            attention_mask = torch.ones_like(input_ids)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)


class _MaskDroppingWithOutlier(_MaskDropping):
    """:class:`_MaskDropping` with a massive activation, as real LLMs have: feature 0 of each sequence's
    first token (position 0) is raised by 1e4."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        out = super().forward(input_ids, attention_mask, position_ids, **kw)
        out.last_hidden_state[..., 0] += 1e4 * (position_ids == 0)
        return out


@pytest.mark.parametrize("wrapper", [_MaskDropping, _MaskDroppingWithOutlier])
def test_packed_falls_back_to_padded_where_the_mask_is_ignored(wrapper):
    """A model that drops the packed row's mask would let the sequences attend to each other: the probe
    finds no mask form it honours, warns once, and the batches run padded (the padded embeddings)."""
    model, tok = build_tiny_model("qwen2")
    common = dict(pooling="mean", normalize=False)  # unnormalized: the outlier would hide the rest
    ref = lf.LLMEmbedder(wrapper(model), tok, **common).encode(TEXTS, output="torch", batch_size=1)
    e = lf.LLMEmbedder(wrapper(model), tok, packed=True, **common)
    with pytest.warns(UserWarning, match="does not isolate the sequences of a packed row"):
        got = e.encode(TEXTS, output="torch")
    assert e._packed_mask_kind() is None
    torch.testing.assert_close(got, ref, atol=3e-6, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probed once: no second warning
        torch.testing.assert_close(e.encode(TEXTS, output="torch"), ref, atol=3e-6, rtol=1e-5)
    from llmembed_fast.embedder import packed as packed_mod

    # the same probe accepts the model itself (so the fallback above is the wrapper's doing)
    assert packed_mod.probe_mask_kind(
        lf.LLMEmbedder(model, tok)._run, vocab_size=model.config.vocab_size, causal=True,
        dtype=torch.float32, device=torch.device("cpu"),
    ) == "4d"


@pytest.mark.parametrize("layout", ["all", "layer_types", "off"])
def test_packed_respects_sliding_windows(layout):
    """The packed row's own mask replaces the model's, sliding windows included: a batch with a sequence
    longer than the window must give what the model computes padded (it ran with full attention), and a
    model whose window does not apply packs as usual."""
    if layout == "layer_types":  # Qwen2 with its sliding layers named per layer (window 4 on layer 1)
        model, tok = build_tiny_model("qwen2", use_sliding_window=True, sliding_window=4,
                                      layer_types=["full_attention", "sliding_attention"])
    elif layout == "all":  # Mistral: every layer slides
        model, tok = build_tiny_model("mistral", sliding_window=4)
    else:
        model, tok = build_tiny_model("qwen2", use_sliding_window=False, sliding_window=4)
    from llmembed_fast.embedder import packed as packed_mod

    # a config without layer_types (transformers 4.51) keeps the window even with use_sliding_window=False:
    # the model's own masks slide there too
    old_config = getattr(model.config, "layer_types", None) is None
    assert packed_mod.sliding_window(model) == (None if layout == "off" and not old_config else 4)
    texts = ["the cat sat on the river bank with a dog and a tree", "hello", "a b"]
    ref = lf.LLMEmbedder(model, tok, pooling="mean").encode(texts, output="torch", batch_size=1)
    got = lf.LLMEmbedder(model, tok, pooling="mean", packed=True).encode(texts, output="torch")
    torch.testing.assert_close(got, ref, atol=3e-6, rtol=0)
    short = lf.LLMEmbedder(model, tok, pooling="mean", packed=True).encode(texts[1:], output="torch")
    torch.testing.assert_close(short, ref[1:], atol=3e-6, rtol=0)


def test_zero_dim_array_is_one_text():
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    np.testing.assert_array_equal(emb.encode(np.array("hello world")), emb.encode("hello world"))
    assert emb.encode(np.array(["hello world", "a"])).shape == (2, 64)


def test_qwen3_embedding_terminator_is_not_doubled():
    """Qwen3-Embedding's tokenizer appends <|endoftext|>, not its eos_token: that token is the terminator
    (pooled last, as Qwen3-Embedding's own code does), and no second EOS is appended."""
    model, _ = build_tiny_model("qwen2")
    tok = make_qwen3_embedding_tokenizer()  # same vocabulary as the tiny Qwen2
    emb = lf.LLMEmbedder(model, tok, prompt_style="qwen3", normalize=False)
    assert emb.info.adds_eos and emb.add_eos
    ids = tok("Instruct: find it\nQuery:the cat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|endoftext|>"
    assert emb.tokenize(["the cat"], instruction="find it")["input_ids"][0].tolist() == ids
    got = emb.encode(["the cat", "a"], instruction="find it", output="torch")[0]
    torch.testing.assert_close(got, _ref_last_hidden(model, ids)[-1], atol=2e-6, rtol=0)


@pytest.mark.parametrize("style", ["prompteol", "pcot"])
def test_prompting_styles_drop_the_eos_the_tokenizer_appends(style):
    """PromptEOL-like styles pool the state after the closing quote, also when the tokenizer appends </s>
    itself (e5-mistral style); truncation then has that token's room for text."""
    model, tok = build_tiny_model("mistral", add_eos=True)
    emb = lf.LLMEmbedder(model, tok, prompt_style=style, normalize=False)
    assert emb.info.adds_eos and not emb.add_eos
    tmpl = PROMPT_STYLES[style].template
    ids = [tok.bos_token_id] + tok(tmpl.replace("{text}", "the cat"), add_special_tokens=False)["input_ids"]
    got = emb.encode(["the cat", "search " * 30], output="torch")[0]
    torch.testing.assert_close(got, _ref_last_hidden(model, ids)[-1], atol=2e-6, rtol=0)
    short = lf.LLMEmbedder(model, tok, prompt_style=style, max_length=len(ids) + 3)
    out = short.tokenize(["search " * 30])["input_ids"][0].tolist()
    assert len(out) == len(ids) + 3 and tok.eos_token_id not in out
    assert tok.decode(out).endswith('search" means in one word:"')


def test_packed_batch_of_empty_texts_gives_zero_rows():
    model, tok = build_tiny_model("qwen2")  # '' has no token at all with mean pooling (no BOS, no EOS)
    texts = ["hello world", "", ""]
    padded = lf.LLMEmbedder(model, tok, pooling="mean").encode(texts, batch_size=1, output="torch")
    packed = lf.LLMEmbedder(model, tok, pooling="mean", packed=True)
    torch.testing.assert_close(packed.encode(texts, batch_size=1, output="torch"), padded, atol=2e-6, rtol=0)
    assert not padded[1:].any()
    assert packed.encode(["", ""], dims=16).shape == (2, 16)


def test_int8_calibrated_on_one_row_raises_and_on_a_few_warns():
    """One row calibrating its own int8/uint8 ranges gives every code the same: a ValueError, as in
    sentence-transformers 6.2; below 100 rows a warning, as sentence-transformers logs one."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    for p in ("int8", "uint8"):
        with pytest.raises(ValueError, match="single row.*calibration_embeddings="):
            emb.encode("hello world", precision=p)
    with pytest.raises(ValueError, match="single row"):
        emb.encode_late_chunks("hello world", ["hello"], precision="int8")
    with pytest.warns(UserWarning, match="here 2 rows") as rec:
        emb.encode(["hello", "world"], precision="int8")
    assert rec[0].filename == __file__  # attributed to the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        emb.encode([f"text {i}" for i in range(100)], precision="int8")
        emb.encode("hello", precision="int8", calibration_embeddings=emb.encode(["a", "b", "c"]))


def test_late_chunks_int8_with_shared_ranges():
    """encode_late_chunks takes ranges / calibration_embeddings as encode does: the chunks of two documents
    then get codes on one scale (each call's own few chunks gave near-sign-bit codes)."""
    from llmembed_fast import quant

    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    sample = emb.encode([f"sample text number {i} about rivers" for i in range(50)])
    ranges = quant.calibrate(sample)
    text = "the cat sat on the mat. the dog ran to the river bank."
    chunks = ["the cat sat on the mat.", "the dog ran to the river bank."]
    f32 = emb.encode_late_chunks(text, chunks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = emb.encode_late_chunks(text, chunks, precision="int8", ranges=ranges)
        got_cal = emb.encode_late_chunks(text, chunks, precision="uint8", calibration_embeddings=sample)
    np.testing.assert_array_equal(got, quant.quantize(f32, "int8", ranges=ranges))
    np.testing.assert_array_equal(got_cal, quant.quantize(f32, "uint8", ranges=ranges))


def test_clear_errors_for_positions_packing_texts_and_folders(tmp_path):
    model, tok = build_tiny_model("gpt2")  # 512 learned positions
    with pytest.raises(ValueError, match="max_length"):
        lf.LLMEmbedder(model, tok, max_length=513)
    assert lf.LLMEmbedder(model, tok, max_length=512).max_length == 512
    qwen, qtok = build_tiny_model("qwen2")  # rotary: its max_position_embeddings is nominal, not a table
    n_pos = qwen.config.max_position_embeddings
    assert lf.LLMEmbedder(qwen, qtok, max_length=n_pos + 1).max_length == n_pos + 1
    import transformers as tf

    torch.manual_seed(0)
    bloom = tf.AutoModel.from_config(tf.BloomConfig(vocab_size=len(tok), hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="packed"):  # ALiBi: forward takes no position_ids
        lf.LLMEmbedder(bloom, tok, packed=True)
    with pytest.raises(ValueError, match="packed"):
        lf.LLMEmbedder(bloom, tok).encode(["a b"], packed=True)
    emb = lf.LLMEmbedder(model, tok)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        emb.encode(["ok", "lone \ud800 surrogate"])
    with pytest.raises(TypeError, match=r"texts\[0\].*bytes"):
        emb.encode([b"hello"])
    with pytest.raises(TypeError, match="texts.*bytes"):
        emb.encode(b"hello")
    with pytest.raises(TypeError, match="normalize"):
        lf.LLMEmbedder(model, tok, normalize="no")
    with pytest.raises(TypeError, match="normalize"):
        emb.encode(["a"], normalize="no")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="path_or_id"):
        lf.LLMEmbedder.from_pretrained(str(tmp_path / "empty"))


def test_decoder_tokenizer_without_eos_pools_the_last_text_token():
    model, tok = build_tiny_model("qwen2")
    tok.eos_token, tok.pad_token = None, "<pad>"
    emb = lf.LLMEmbedder(model, tok, normalize=False)
    assert emb.pooling == "last" and not emb.add_eos
    ids = tok("the cat")["input_ids"]
    torch.testing.assert_close(
        emb.encode(["the cat", "a"], output="torch")[0], _ref_last_hidden(model, ids)[-1], atol=2e-6, rtol=0
    )
    with pytest.raises(ValueError, match="eos"):
        lf.LLMEmbedder(model, tok, add_eos=True)


def test_pandas_series_and_home_relative_folder(tmp_path, monkeypatch):
    """A pandas Series of texts (df["text"]) encodes like its list; "~/folder" is the user's folder."""
    pd = pytest.importorskip("pandas")
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    texts = ["hello world", "the cat", "a"]
    np.testing.assert_array_equal(emb.encode(pd.Series(texts, index=[7, 3, 5])), emb.encode(texts))
    emb.save_pretrained(tmp_path / "saved")
    monkeypatch.setenv("HOME", str(tmp_path))
    again = lf.LLMEmbedder.from_pretrained("~/saved", device="cpu")
    np.testing.assert_allclose(again.encode(texts), emb.encode(texts), atol=1e-6, rtol=0)


def test_boolean_settings_and_prompts_are_checked():
    """add_eos / include_prompt / lowercase take True, False or None as normalize does (a truthy string used
    to turn them on: add_eos="no" appended EOS); prompts must map names to prompt strings."""
    model, tok = build_tiny_model("qwen2")
    for name in ("add_eos", "include_prompt", "lowercase"):
        for bad in ("no", "false", 1, [True]):
            with pytest.raises(TypeError, match=f"{name} must be True, False or None"):
                lf.LLMEmbedder(model, tok, **{name: bad})
    folder = cached_tiny_model_dir("qwen2")
    for name in ("add_eos", "include_prompt"):
        with pytest.raises(TypeError, match=name):
            lf.LLMEmbedder.from_pretrained(folder, device="cpu", **{name: "no"})
    # None keeps its meaning (the style's / model's default); numpy booleans are booleans
    default = lf.LLMEmbedder(model, tok, add_eos=None, include_prompt=None, lowercase=None)
    assert (default.add_eos, default.include_prompt, default.lowercase) == (True, False, False)
    off = lf.LLMEmbedder(model, tok, add_eos=np.bool_(False), include_prompt=np.bool_(True))
    assert (off.add_eos, off.include_prompt) == (False, True)
    assert off._tokenize(["hi"]).ids[0] == tok("hi")["input_ids"]
    for bad in (["query: "], "query: ", {"query": 3}, {1: "q: "}):
        with pytest.raises(TypeError, match="prompts"):
            lf.LLMEmbedder(model, tok, prompts=bad)
    assert lf.LLMEmbedder(model, tok, prompts=None).prompts == {}


def test_default_prompt_name_device_and_dtype_are_checked_when_built():
    """A default_prompt_name outside the prompts was accepted, and every later encode failed naming
    prompt_name, an argument the caller never gave (sentence-transformers refuses it when built); a bad
    device or dtype raised torch's own errors, naming no argument."""
    model, tok = build_tiny_model("qwen2")
    prompts = {"query": "query: "}
    for kw, err, msg in (
        ({"default_prompt_name": "query"}, ValueError, r"'query' is not one of the prompts \[\]"),
        ({"prompts": prompts, "default_prompt_name": "qury"}, ValueError, r"one of the prompts \['query'\]"),
        ({"prompts": prompts, "default_prompt_name": 3}, TypeError, "default_prompt_name must be a string"),
        ({"device": "gpu"}, ValueError, "device: 'gpu' is not a torch device"),
        ({"device": 3.5}, TypeError, "device must be a torch.device"),
        ({"device": True}, TypeError, "device must be a torch.device"),
        ({"dtype": torch.int8}, ValueError, "dtype must be a floating-point dtype"),
    ):
        with pytest.raises(err, match=msg):
            lf.LLMEmbedder(model, tok, **kw)
    folder = cached_tiny_model_dir("qwen2")
    with pytest.raises(ValueError, match="device: 'gpu'"):
        lf.LLMEmbedder.from_pretrained(folder, device="gpu")
    ok = lf.LLMEmbedder(model, tok, prompts=prompts, default_prompt_name="query", device="cpu")
    assert ok.default_prompt_name == "query"
    np.testing.assert_array_equal(ok.encode(["hi"]), ok.encode(["hi"], prompt="query: "))
    assert lf.LLMEmbedder(model, tok, device=torch.device("cpu"), dtype="float32").default_prompt_name is None


@pytest.mark.parametrize("precision", ["float32", "float16", "binary", "ubinary"])
def test_ranges_and_calibration_refused_unless_int8(precision):
    """ranges / calibration_embeddings only calibrate int8 / uint8: with any other precision they were
    ignored silently (even ones of the wrong shape); the CLI refuses --ranges the same way."""
    model, tok = build_tiny_model("qwen2")
    emb = lf.LLMEmbedder(model, tok)
    ranges = np.zeros((2, 64), np.float32)
    sample = np.ones((4, 64), np.float32)
    calls = (lambda **kw: emb.encode(["hello", "world"], precision=precision, **kw),
             lambda **kw: emb.encode_late_chunks("hello world", ["hello"], precision=precision, **kw))
    for call in calls:
        with pytest.raises(ValueError, match="ranges applies to precision 'int8' / 'uint8' only"):
            call(ranges=ranges)
        with pytest.raises(ValueError, match="calibration_embeddings applies to precision"):
            call(calibration_embeddings=sample)
        assert np.isfinite(call().astype(np.float32)).all()


def test_padding_side_defaults_to_the_tokenizers():
    """padding_side=None takes the tokenizer's side, and tokenize() batches are laid out that way."""
    model, tok = build_tiny_model("qwen2")
    tok.padding_side = "left"
    emb = lf.LLMEmbedder(model, tok)
    assert emb.padding_side == "left"
    b = emb.tokenize(["a", "a b c d"])
    assert b["attention_mask"][0, 0] == 0 and b["attention_mask"][0, -1] == 1
