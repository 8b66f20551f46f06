"""LLMEmbedder on model families with their own conventions, against each model's own forward or
sentence-transformers: RoBERTa-style position tables (positions from padding_idx + 1), OPT's projected
output width, EmbeddingGemma-style bidirectional decoders in the packed path, lower-casing sentence-
transformers folders with prompts, and sentence-transformers' weighted mean with an excluded prompt. Then
the argument checks of custom prompt styles, late-chunk spans and non-Unicode prompts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers as tf
from st_compat import st_prompt, st_texts
from tiny_models import cached_tiny_model_dir, make_st_model, make_tokenizer

import llmembed_fast as lf
from llmembed_fast.embedder.prompts import PromptStyle

TEXTS = ["hello world", "the cat sat on the river bank today", "a", "x y z " * 9]


def _own_mean(model, tok, texts) -> torch.Tensor:
    """Mean of each text's last hidden states, one unpadded text per forward (the model's own positions)."""
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            rows.append(model(input_ids=ids).last_hidden_state[0].mean(0))
    return torch.stack(rows)


def _random_init(model, seed: int, std: float = 0.08):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("cfg_cls", [tf.RobertaConfig, tf.XLMRobertaConfig, tf.MPNetConfig])
@pytest.mark.parametrize("side", ["right", "left"])
def test_roberta_style_positions_match_the_models_own_forward(cfg_cls, side):
    """RoBERTa, XLM-R (multilingual-e5) and MPNet number positions from padding_idx + 1."""
    tok = make_tokenizer("bert")
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=66, pad_token_id=tok.pad_token_id)
    model = _random_init(tf.AutoModel.from_config(cfg), 0)
    emb = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, padding_side=side)
    got = emb.encode(TEXTS, output="torch")
    torch.testing.assert_close(got, _own_mean(model, tok, TEXTS), rtol=0, atol=2e-5)
    # the table holds 66 - (padding_idx + 1) positions (MPNet's padding_idx is 1 whatever the config says):
    # the default max_length fits, a longer one is refused
    assert emb.max_length == 66 - model.embeddings.position_embeddings.padding_idx - 1
    assert emb.encode(["word " * 200], output="torch").isfinite().all()
    with pytest.raises(ValueError, match="max_length=66 is longer"):
        lf.LLMEmbedder(model, tok, max_length=66)


@pytest.mark.parametrize("packed", [False, True])
def test_output_width_is_the_models_not_hidden_size(packed):
    """OPT-350m projects its last hidden state to word_embed_proj_dim (< hidden_size)."""
    tok = make_tokenizer("gpt2")
    cfg = tf.OPTConfig(vocab_size=len(tok), hidden_size=64, word_embed_proj_dim=32, ffn_dim=96,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                       pad_token_id=tok.pad_token_id or 0, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model = _random_init(tf.AutoModel.from_config(cfg), 1)
    emb = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, packed=packed)
    assert emb.embedding_dim == 32
    got = emb.encode(TEXTS, output="torch")
    torch.testing.assert_close(got, _own_mean(model, tok, TEXTS), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="dims must be at most the model's output width 32"):
        lf.LLMEmbedder(model, tok, dims=48)


def test_bidirectional_decoder_packed_equals_padded():
    """EmbeddingGemma-style gemma3_text with use_bidirectional_attention: the packed path's block mask is
    not causal."""
    if not hasattr(tf, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma3TextConfig")
    tok = make_tokenizer("llama")
    cfg = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256, use_bidirectional_attention=True,
                              sliding_window=256, pad_token_id=tok.eos_token_id)
    if not getattr(cfg, "use_bidirectional_attention", False):
        pytest.skip("this transformers' Gemma3TextConfig has no use_bidirectional_attention")
    model = _random_init(tf.AutoModel.from_config(cfg, attn_implementation="sdpa"), 2)
    kw = {"pooling": "mean", "normalize": False}
    padded = lf.LLMEmbedder(model, tok, packed=False, **kw)
    assert padded.is_decoder and not padded.causal
    a = padded.encode(TEXTS, output="torch")
    b = lf.LLMEmbedder(model, tok, packed=True, **kw).encode(TEXTS, output="torch")
    torch.testing.assert_close(a, _own_mean(model, tok, TEXTS), rtol=0, atol=2e-5)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


def _st_folder(tmp_path, arch, pooling, **kw) -> str:
    out = str(tmp_path / f"st-{arch}-{pooling}")
    make_st_model(cached_tiny_model_dir(arch), pooling, normalize=False, save_to=out, **kw)
    return out


def test_lowercasing_folder_lowers_the_prompt_too(tmp_path):
    """sentence-transformers' do_lower_case lowers prompt + text together."""
    from sentence_transformers import SentenceTransformer

    folder = _st_folder(tmp_path, "qwen2", "mean", prompts={"query": "Query: "})
    path = os.path.join(folder, "sentence_bert_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["do_lower_case"] = True
    with open(path, "w") as f:
        json.dump(cfg, f)
    st = SentenceTransformer(folder, device="cpu")
    emb = lf.LLMEmbedder.from_pretrained(folder, device="cpu")
    assert emb.lowercase
    texts = ["Hello World", "The CAT sat"]
    for kw in ({}, {"prompt_name": "query"}):
        np.testing.assert_allclose(emb.encode(texts, **kw), st.encode(texts, **kw), rtol=0, atol=2e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_weighted_mean_without_prompt_matches_sentence_transformers(tmp_path, packed, side):
    """sentence-transformers weighs by position in the whole sequence, the excluded prompt's tokens
    counted; the empty text pools nothing (zeros) in both. (Texts and prompt as sentence-transformers 5
    tokenizes them there: stripped.)"""
    folder = _st_folder(tmp_path, "llama", "weightedmean", include_prompt=False,
                        prompts={"query": st_prompt("query:\n")})
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu")
    texts = st_texts(TEXTS + [""])
    want = st.encode(texts, prompt_name="query")
    emb = lf.LLMEmbedder.from_pretrained(folder, device="cpu", packed=packed, padding_side=side)
    assert emb.pooling == "weighted_mean" and not emb.include_prompt
    np.testing.assert_allclose(emb.encode(texts, prompt_name="query"), want, rtol=0, atol=2e-6)
    got = emb.encode(texts, prompt_name="query", dims=16, normalize=True)
    head = want[:, :16] / np.maximum(np.linalg.norm(want[:, :16], axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(got, head, rtol=0, atol=2e-6)
    # forward (training) pools the same way
    batch = emb.tokenize(texts[:2], prompt=st.prompts["query"])
    with torch.no_grad():
        np.testing.assert_allclose(emb(batch).numpy(), want[:2], rtol=0, atol=2e-6)


def test_custom_prompt_style_is_checked_when_constructed():
    model, tok = _tiny_qwen2()
    e = lf.LLMEmbedder(model, tok, prompt_style=PromptStyle("x", "Q: {text}", pooling="cls"))
    assert e.pooling == "first"  # the sentence-transformers alias, as pooling= takes it
    with pytest.raises(ValueError, match="prompt_style.pooling"):
        lf.LLMEmbedder(model, tok, prompt_style=PromptStyle("x", "Q: {text}", pooling="median"))
    with pytest.raises(ValueError, match=r"prompt_style.pool_copy must be an integer in \[0, 1\)"):
        lf.LLMEmbedder(model, tok, prompt_style=PromptStyle("x", "Q: {text}", pool_copy=1))
    with pytest.raises(TypeError, match="prompt_style.add_eos"):
        lf.LLMEmbedder(model, tok, prompt_style=PromptStyle("x", "Q: {text}", add_eos="yes"))
    with pytest.raises(ValueError, match="prompt_style.instruction_template must contain"):
        lf.LLMEmbedder(model, tok, prompt_style=PromptStyle("x", instruction_template="{text}"))


def _tiny_qwen2():
    from tiny_models import build_tiny_model

    return build_tiny_model("qwen2")


def test_invalid_unicode_and_spans_name_the_argument():
    model, tok = _tiny_qwen2()
    e = lf.LLMEmbedder(model, tok, pooling="mean")
    with pytest.raises(ValueError, match="text cannot be tokenized"):
        e.encode_late_chunks("a \ud800 b", [(0, 1)])
    with pytest.raises(ValueError, match="instruction cannot be tokenized"):
        e.encode(["a b"], instruction="find \ud800")
    with pytest.raises(ValueError, match="prompt cannot be tokenized"):
        e.encode(["a b"], prompt="q \ud800: ")
    text = "one two. three four five."
    with pytest.raises(TypeError, match=r"chunks\[0\] must hold integer character offsets"):
        e.encode_late_chunks(text, [(0.5, 7.2)])
    want = e.encode_late_chunks(text, [(0, 8), (9, len(text))])
    for spans in (np.array([[0, 8], [9, len(text)]]), torch.tensor([[0, 8], [9, len(text)]])):
        np.testing.assert_array_equal(e.encode_late_chunks(text, spans), want)


def test_literal_placeholders_in_prompts_and_upper_case_jsonl(tmp_path):
    from llmembed_fast.cli_encode import read_texts
    from llmembed_fast.embedder.prompts import compose

    # the instruction fills the instruction template's slot only, not a literal '{instruction}' in a prompt
    assert compose("use {instruction} here: {text}", "find", None) == \
        "Instruct: find\nQuery: use {instruction} here: {text}"
    path = tmp_path / "TEXTS.JSONL"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert read_texts(str(path), "text") == ["a", "b"]


def test_compiled_model_stays_compiled():
    """A torch.compile'd AutoModel runs compiled (its backend sees the graphs); a compiled *ForCausalLM is
    reduced to its base model, uncompiled, with a warning. Same embeddings as the plain model."""
    from tiny_models import build_tiny_model, make_config

    model, tok = build_tiny_model("qwen2")
    want = lf.LLMEmbedder(model, tok).encode(TEXTS, output="torch")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    emb = lf.LLMEmbedder(compiled, tok)
    assert emb.model is compiled and emb._takes_position_ids
    torch.testing.assert_close(emb.encode(TEXTS, output="torch"), want, rtol=0, atol=1e-5)
    assert graphs, "the compiled model was not run"
    lm = tf.AutoModelForCausalLM.from_config(make_config("qwen2", len(tok)))
    with pytest.warns(UserWarning, match="base model of the torch.compile'd") as rec:
        emb = lf.LLMEmbedder(torch.compile(lm, backend="eager"), tok)
    assert rec[0].filename == __file__
    assert emb.model is lm.base_model


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_save_pretrained_round_trip(tmp_path, arch):
    """save_pretrained writes model, tokenizer and settings; from_pretrained gives the same embedder (an
    argument passed to from_pretrained still wins)."""
    folder = cached_tiny_model_dir(arch)
    style = PromptStyle("mine", "Represent: {text}", pooling="mean", include_prompt=False,
                        instruction_template="Task: {instruction}\n{text}")
    emb = lf.LLMEmbedder.from_pretrained(folder, device="cpu", prompt_style=style, dims=16, normalize=False,
                                         max_length=24, padding_side="left")
    emb.prompts = {"query": "q: "}
    texts = TEXTS + ["word " * 40]
    want = emb.encode(texts, instruction="find it", prompt_name="query")
    emb.save_pretrained(tmp_path / "saved")
    back = lf.LLMEmbedder.from_pretrained(tmp_path / "saved", device="cpu")
    for key in ("pooling", "normalize", "dims", "max_length", "padding_side", "add_eos", "include_prompt",
                "instruction_template", "style", "prompts", "lowercase"):
        assert getattr(back, key) == getattr(emb, key), key
    np.testing.assert_array_equal(back.encode(texts, instruction="find it", prompt_name="query"), want)
    assert lf.LLMEmbedder.from_pretrained(tmp_path / "saved", device="cpu", dims=8).dims == 8
    (tmp_path / "saved" / "llmembed_fast.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an llmembed_fast settings file"):
        lf.LLMEmbedder.from_pretrained(tmp_path / "saved", device="cpu")


def test_gemma4_vision_only_bidirectional_text_stays_causal():
    """Gemma 4's use_bidirectional_attention="vision" lets image tokens attend both ways; text is causal,
    so the packed block mask must be causal too."""
    if not hasattr(tf, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma4TextConfig")
    tok = make_tokenizer("qwen2")
    try:
        cfg = tf.Gemma4TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16,
                                  use_bidirectional_attention="vision", pad_token_id=tok.pad_token_id,
                                  hidden_size_per_layer_input=0, vocab_size_per_layer_input=len(tok))
    except (TypeError, ValueError) as exc:
        pytest.skip(f"this transformers' Gemma4TextConfig differs: {exc}")
    model = _random_init(tf.AutoModel.from_config(cfg, attn_implementation="sdpa"), 3)
    own = _own_mean(model, tok, TEXTS)
    for packed in (False, True):
        emb = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False, packed=packed, add_eos=False)
        assert emb.causal
        torch.testing.assert_close(emb.encode(TEXTS, output="torch"), own, rtol=0, atol=2e-5)


def test_index_pickles_and_copies():
    import copy
    import pickle

    from llmembed_fast import quant

    index = quant.Index(16, "binary", "int8").add(np.random.default_rng(0).standard_normal((20, 16)))
    q = np.random.default_rng(1).standard_normal((3, 16))
    want = index.search(q, 4)
    for other in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        other.add(np.ones((2, 16)))  # its own lock and parts
        got = other.search(q, 4)
        assert len(other) == 22 and len(index) == 20
        np.testing.assert_array_equal(got[1][:, :2], want[1][:, :2])


def test_saved_add_eos_yields_to_another_pooling(tmp_path):
    """A save of the defaults (last-token pooling: EOS appended) reloaded with pooling="mean" resolves EOS
    as the original folder does with pooling="mean" (the saved True was kept: EOS pooled into the mean);
    reloaded as saved, or with an explicit add_eos, the save / the call decide."""
    folder = cached_tiny_model_dir("qwen2")
    first = lf.LLMEmbedder.from_pretrained(folder, device="cpu")
    assert first.add_eos
    first.save_pretrained(tmp_path / "s")
    want = lf.LLMEmbedder.from_pretrained(folder, device="cpu", pooling="mean")
    back = lf.LLMEmbedder.from_pretrained(tmp_path / "s", device="cpu", pooling="mean")
    assert back.add_eos == want.add_eos is False
    np.testing.assert_array_equal(back.encode(TEXTS), want.encode(TEXTS))
    assert lf.LLMEmbedder.from_pretrained(tmp_path / "s", device="cpu").add_eos
    assert lf.LLMEmbedder.from_pretrained(tmp_path / "s", device="cpu", pooling="mean", add_eos=True).add_eos


def test_saved_settings_yield_to_an_explicit_prompt_style(tmp_path):
    folder = cached_tiny_model_dir("bert")
    lf.LLMEmbedder.from_pretrained(folder, device="cpu").save_pretrained(tmp_path / "s")
    style = PromptStyle("x", "{text}", pooling="first", include_prompt=True)
    back = lf.LLMEmbedder.from_pretrained(tmp_path / "s", device="cpu", prompt_style=style)
    assert (back.pooling, back.include_prompt) == ("first", True)
    model, tok = _tiny_qwen2()
    assert lf.LLMEmbedder(model, tok).encode_float([]).shape == (0, 64)


def test_position_ids_buffer_offset_models():
    """Nystromformer / MRA count positions from 2 (their embeddings' position_ids buffer), with no padding
    row in the table. (Nystromformer's landmark attention also depends on padding, so it is compared on
    one text.)"""
    from llmembed_fast.embedder.hf_model import position_offset

    tok = make_tokenizer("bert")
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=66, pad_token_id=tok.pad_token_id)
    cases = [(getattr(tf, "MraConfig", None), {}, TEXTS),
             (getattr(tf, "NystromformerConfig", None), {"segment_means_seq_len": 8, "num_landmarks": 8},
              TEXTS[1:2])]
    for cfg_cls, extra, texts in cases:
        if cfg_cls is None:
            continue
        model = _random_init(tf.AutoModel.from_config(cfg_cls(**common, **extra)), 4)
        assert position_offset(model) == 2
        got = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False).encode(texts, output="torch")
        torch.testing.assert_close(got, _own_mean(model, tok, texts), rtol=0, atol=2e-5)


@pytest.mark.parametrize("cfg_cls", [tf.GPTJConfig, tf.CodeGenConfig])
def test_gptj_codegen_rotary_tables_keep_max_length_within_n_positions(cfg_cls):
    """GPT-J and CodeGen declare rotary through ``rotary_dim``, but transformers precomputes n_positions
    rows of sin/cos and indexes them: a longer sequence fails in the model, so max_length > n_positions is
    refused as for a learned table (GPT-2), not let through as for rope_theta models."""
    from llmembed_fast.embedder.hf_model import rotary_positions

    tok = make_tokenizer("gpt2")
    cfg = cfg_cls(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4, rotary_dim=8, n_positions=16,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = _random_init(tf.AutoModel.from_config(cfg), 5)
    assert not rotary_positions(cfg)
    # the model itself cannot run past its table (IndexError in transformers 5.24, RuntimeError in 5.17)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        model(input_ids=torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_length=17 is longer"):
        lf.LLMEmbedder(model, tok, max_length=17)
    emb = lf.LLMEmbedder(model, tok, pooling="mean", normalize=False)
    assert emb.max_length == 16
    got = emb.encode(TEXTS + ["word " * 40], output="torch")
    assert got.isfinite().all()
    torch.testing.assert_close(got[:3], _own_mean(model, tok, TEXTS[:3]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_from_pretrained_loads_the_weights_in_the_asked_dtype(tmp_path, dtype):
    """dtype= reaches transformers under the name it takes (``dtype`` from 4.56, ``torch_dtype`` before:
    ``dtype`` went to the model's __init__ there and failed), for from_pretrained and load_weights."""
    want = torch.bfloat16 if dtype is torch.bfloat16 else torch.float16
    emb = lf.LLMEmbedder.from_pretrained(cached_tiny_model_dir("qwen2"), device="cpu", dtype=dtype)
    assert {p.dtype for p in emb.model.parameters()} == {want}
    out = emb.encode(TEXTS[:3], output="torch")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    emb.save_pretrained(tmp_path / "saved")
    emb.load_weights(tmp_path / "saved")
    assert {p.dtype for p in emb.model.parameters()} == {want}
    torch.testing.assert_close(emb.encode(TEXTS[:3], output="torch"), out, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
@pytest.mark.parametrize("packed", [False, True])
def test_batch_wide_rope_scaling_keeps_each_text_its_own(kind, packed):
    """Dynamic-NTK and longrope rotary pick one set of frequencies for the whole batch once its longest
    sequence passes the original length: a short text batched with a long one was embedded with the long
    set (6e-3 off its own forward). Texts past that length now run in batches of their own."""
    tok = make_tokenizer("llama")
    head = 64 // 4
    half = head // 2
    scaling = ({"rope_type": "dynamic", "factor": 2.0} if kind == "dynamic" else
               {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [3.0] * half,
                "original_max_position_embeddings": 16, "factor": 4.0})
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16 if
                         kind == "dynamic" else 64, rope_scaling=scaling, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    emb = lf.LLMEmbedder(model, tok, max_length=60, packed=packed, normalize=False)
    assert emb._rope_switch == 16
    texts = ["the cat", "a long text about many things " * 5, "short one here", "x"]
    together = emb.encode(texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(together[i], emb.encode([t])[0], rtol=0, atol=1e-5, err_msg=t)
