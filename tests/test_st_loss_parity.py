"""CachedFusedMNRLoss against sentence-transformers' CachedMultipleNegativesRankingLoss: same model (tiny
random BERT / Qwen2 with dropout on, train mode), same batch and seed -> same loss and parameter gradients."""
from __future__ import annotations

import inspect
import os
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
sys.path.insert(0, os.path.dirname(__file__))
from st_compat import st_5_4_to_5_6, st_has_gradcache, st_old_layout, st_pooling  # noqa: E402
from st_compat import st_loss as st_loss_class  # noqa: E402
from tiny_models import cached_tiny_model_dir, corpus, make_st_model  # noqa: E402

from llmembed_fast.integrations.st_losses import CachedFusedMNRLoss  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_backend")  # the ops' CPU path

# what the installed sentence-transformers' cached loss has, read from it (5.1 - 5.5 lack each of these)
_ST_CACHED_ARGS = inspect.signature(st_loss_class("CachedMultipleNegativesRankingLoss").__init__).parameters
ST_DIRECTIONS = "directions" in _ST_CACHED_ARGS  # query_to_query / doc_to_doc terms
ST_TOKEN_BUDGET = "mini_batch_num_tokens" in _ST_CACHED_ARGS
# its gradcache module (5.7, 6) trims each mini-batch's trailing padding (_create_minibatch), as the fused
# loss does by default; before it, mini-batches keep the batch's width, and dropout masks depend on the
# width: the fused loss is compared untrimmed there
ST_GRADCACHE = st_has_gradcache()
# a Pooling without _exclude_prompt_from_mask (5.1 - 5.3) zeroes the prompt in the caller's attention mask
ST_MASK_IN_PLACE = not hasattr(st_pooling(), "_exclude_prompt_from_mask")
ST_5_4_TO_5_6 = st_5_4_to_5_6()  # not compared where noted (not run in CI)
FUSED_ST = {} if ST_GRADCACHE else {"trim_padding": False}


def fused(model, **kw):
    """CachedFusedMNRLoss forming the installed sentence-transformers' mini-batches."""
    return CachedFusedMNRLoss(model, **FUSED_ST, **kw)


def st_cached_mnrl(model, **kw):
    CachedMultipleNegativesRankingLoss = st_loss_class("CachedMultipleNegativesRankingLoss")

    return CachedMultipleNegativesRankingLoss(model, **kw)


def features(model, columns):
    return [dict(model.tokenize(col)) for col in columns]


def run(loss_obj, model, feats, seed):
    torch.manual_seed(seed)
    # copies: sentence-transformers 5.1's Pooling(include_prompt=False) zeroes the prompt in the mask in place
    copies = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in feats]
    loss = loss_obj(copies, None)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a, b, rtol=1e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    assert ga.keys() == gb.keys() and len(ga) > 0
    scale = max(g.abs().max().item() for g in gb.values())
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def bert_st():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_st_model(cached_tiny_model_dir("bert"), "mean", normalize=False)
    model.train()
    return model


TEXTS = corpus(40, seed=3)


@pytest.mark.parametrize("mini_batch_size", [3, 7])
def test_pairs(bert_st, mini_batch_size):
    feats = features(bert_st, [TEXTS[:7], TEXTS[7:14]])
    want = run(st_cached_mnrl(bert_st, scale=20.0, mini_batch_size=mini_batch_size), bert_st, feats, 5)
    got = run(fused(bert_st, scale=20.0, mini_batch_size=mini_batch_size), bert_st, feats, 5)
    assert_same(got, want)


def test_hard_negatives_symmetric(bert_st):
    feats = features(bert_st, [TEXTS[:6], TEXTS[6:12], TEXTS[12:18], TEXTS[18:24]])
    want = run(st_cached_mnrl(bert_st, scale=10.0, mini_batch_size=4), bert_st, feats, 6)
    got = run(fused(bert_st, scale=10.0, mini_batch_size=4), bert_st, feats, 6)
    assert_same(got, want)
    if not ST_DIRECTIONS:  # its symmetric cached loss is the same (the mean of the two directions' CE)
        st = st_loss_class("CachedMultipleNegativesSymmetricRankingLoss")(bert_st, scale=10.0,
                                                                          mini_batch_size=4)
    else:
        st = st_cached_mnrl(bert_st, scale=10.0, mini_batch_size=4, partition_mode="per_direction",
                            directions=("query_to_doc", "doc_to_query"))
    want = run(st, bert_st, feats, 7)
    got = run(fused(bert_st, scale=10.0, mini_batch_size=4, symmetric=True), bert_st, feats, 7)
    assert_same(got, want)


@pytest.mark.skipif(not ST_DIRECTIONS, reason="this sentence-transformers' cached MNRL has no directions= "
                    "(query_to_query / doc_to_doc terms)")
def test_same_tower_pairs(bert_st):
    """GTE-style: query-query and document-document terms in one partition function (pairs only: with hard
    negatives sentence-transformers also leaves out the anchor's own negatives in doc_to_doc)."""
    if not ST_GRADCACHE:
        pytest.skip("this sentence-transformers' directions= (5.2 - 5.6) gives another same-tower loss than "
                    "5.7 / 6, whose definition the fused loss follows")
    feats = features(bert_st, [TEXTS[:6], TEXTS[6:12]])
    st = st_cached_mnrl(bert_st, mini_batch_size=4,
                        directions=("query_to_doc", "query_to_query", "doc_to_doc"))
    want = run(st, bert_st, feats, 8)
    got = run(CachedFusedMNRLoss(bert_st, mini_batch_size=4, same_tower=True), bert_st, feats, 8)
    assert_same(got, want)


def test_matryoshka_one_pass(bert_st):
    """MatryoshkaLoss(CachedMNRL) reruns the loss per dim; ours sums the dims in one pass."""
    MatryoshkaLoss = st_loss_class("MatryoshkaLoss")

    feats = features(bert_st, [TEXTS[:5], TEXTS[5:10], TEXTS[10:15]])
    dims, weights = [64, 32, 8], [1.0, 0.5, 0.25]
    st = MatryoshkaLoss(bert_st, st_cached_mnrl(bert_st, mini_batch_size=2), dims, matryoshka_weights=weights)
    want = run(st, bert_st, feats, 9)
    got = run(fused(bert_st, mini_batch_size=2, matryoshka_dims=dims, matryoshka_weights=weights), bert_st,
              feats, 9)
    assert_same(got, want)


def test_decoder_last_token():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_st_model(cached_tiny_model_dir("qwen2"), "lasttoken", normalize=True)
    model.train()
    feats = features(model, [TEXTS[20:25], TEXTS[25:30]])
    want = run(st_cached_mnrl(model, mini_batch_size=2), model, feats, 10)
    got = run(fused(model, mini_batch_size=2), model, feats, 10)
    assert_same(got, want)


@pytest.mark.skipif(ST_5_4_TO_5_6, reason="not verified against sentence-transformers 5.4 - 5.6's cached "
                    "loss with prompts (its gradients differ here)")
def test_prompt_length_excluded_from_pooling():
    """A Pooling with include_prompt=False reads the features' prompt_length. Training on a map-style Dataset
    collates it to a one-element tensor: one value for the batch (before the fix, chunking read it as a
    batch of one and refused the batch). sentence-transformers' own cached loss slices that tensor to
    nothing past the first mini-batch, so it is compared here on the per-row form, which it handles.

    sentence-transformers 5.1's Pooling zeroes the prompt in the attention mask in place (6 works on a copy,
    pooling.py _exclude_prompt_from_mask): its cached loss re-embeds with the prompt unattended, so its
    gradients are not those of its loss. Under 5.1 the reference is its uncached loss (the same definition,
    one forward) without dropout; the cached one gives the loss under dropout."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_st_model(cached_tiny_model_dir("bert"), "mean", normalize=False, include_prompt=False)
    model.train()
    feats = features(model, [TEXTS[:6], TEXTS[6:12]])
    per_row = [dict(f, prompt_length=torch.full((6,), 3)) for f in feats]
    if ST_MASK_IN_PLACE:
        got = run(fused(model, mini_batch_size=4), model, per_row, 12)[0]
        torch.testing.assert_close(got, run(st_cached_mnrl(model, mini_batch_size=4), model, per_row, 12)[0],
                                   rtol=1e-5, atol=0)
        model.eval()

    def reference():
        if ST_MASK_IN_PLACE:
            return st_loss_class("MultipleNegativesRankingLoss")(model)
        return st_cached_mnrl(model, mini_batch_size=4)

    want = run(reference(), model, per_row, 12)
    ignored = run(reference(), model, feats, 12)
    assert not torch.allclose(want[0], ignored[0])  # the prompt tokens matter to this loss
    for pl in (torch.tensor([3]), 3, torch.full((6,), 3)):
        got = run(fused(model, mini_batch_size=4), model, [dict(f, prompt_length=pl) for f in feats], 12)
        assert_same(got, want)


def test_bad_arguments(bert_st):
    with pytest.raises(ValueError, match="similarity_fct"):
        CachedFusedMNRLoss(bert_st, similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedFusedMNRLoss(bert_st, mini_batch_size=0)
    with pytest.raises(ValueError, match="scale"):
        CachedFusedMNRLoss(bert_st, scale=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        CachedFusedMNRLoss(bert_st)(features(bert_st, [TEXTS[:3]]), None)
    # checked at construction (a string of dims became digits, 32.5 became 32, "no" turned symmetric on)
    for kw, exc, msg in ((dict(matryoshka_dims="64"), TypeError, "matryoshka_dims"),
                         (dict(matryoshka_dims=[32.5]), TypeError, "matryoshka_dims"),
                         (dict(matryoshka_dims=[8, 8]), ValueError, "strictly increasing"),
                         (dict(matryoshka_dims=[0, 8]), ValueError, "matryoshka_dims"),
                         (dict(matryoshka_dims=[8, 16], matryoshka_weights=["a", 1]), TypeError, "weights"),
                         (dict(symmetric="no"), TypeError, "symmetric"),
                         (dict(same_tower=1), TypeError, "same_tower"),
                         (dict(false_negative_margin="0.1"), TypeError, "false_negative_margin"),
                         (dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin")):
        with pytest.raises(exc, match=msg):
            CachedFusedMNRLoss(bert_st, **kw)
    assert CachedFusedMNRLoss(bert_st, matryoshka_dims=(16, 8), matryoshka_weights=(1, 0.5)).matryoshka_dims \
        == (8, 16)
    from sentence_transformers import util

    config = CachedFusedMNRLoss(bert_st, similarity_fct=util.cos_sim).get_config_dict()
    assert config["similarity_fct"] == "cos_sim"
    # numpy scalars, as CachedMultipleNegativesRankingLoss takes them (they were refused)
    loss = CachedFusedMNRLoss(bert_st, scale=np.float32(20.0), mini_batch_size=np.int64(16),
                              mini_batch_num_tokens=np.int64(512))
    assert (loss.scale, loss.mini_batch_size, loss.mini_batch_num_tokens) == (20.0, 16, 512)
    assert type(loss.mini_batch_size) is int


def test_same_tower_hard_negatives_definition(bert_st):
    """With hard negatives, same_tower's document-document term scores the positive against every candidate
    j != p, the anchor's own hard negatives included. sentence-transformers' doc_to_doc leaves those out, so
    the two differ here (documented in CachedFusedMNRLoss)."""
    import torch.nn.functional as F

    feats = features(bert_st, [TEXTS[:5], TEXTS[5:10], TEXTS[10:15]])
    bert_st.eval()  # no dropout: the reference embeds each column at once
    try:
        ours = CachedFusedMNRLoss(bert_st, scale=20.0, mini_batch_size=2, same_tower=True)
        got = run(ours, bert_st, feats, 11)
        q, pos, neg = (F.normalize(bert_st(dict(f))["sentence_embedding"], dim=-1) for f in feats)
        d = torch.cat([pos, neg])
        B, n_cand = q.shape[0], d.shape[0]
        eye_q = torch.eye(B, n_cand, dtype=torch.bool)  # (i, p = i)
        terms = torch.cat([
            20.0 * q @ d.T,  # every candidate
            (20.0 * q @ q.T).masked_fill(torch.eye(B, dtype=torch.bool), float("-inf")),  # other queries
            (20.0 * pos @ d.T).masked_fill(eye_q, float("-inf")),  # every candidate j != p
        ], dim=1)
        loss = (torch.logsumexp(terms, 1) - 20.0 * (q * pos).sum(-1)).mean()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in bert_st.named_parameters() if p.grad is not None}
        want = (loss.detach(), grads)
        bert_st.zero_grad(set_to_none=True)
        assert_same(got, want)
        if not ST_DIRECTIONS:
            pytest.skip("the reference above holds; this sentence-transformers has no directions= "
                        "(doc_to_doc) to compare with")
        st = st_cached_mnrl(bert_st, mini_batch_size=2,
                            directions=("query_to_doc", "query_to_query", "doc_to_doc"))
        st_loss, _ = run(st, bert_st, feats, 11)
        assert abs(st_loss.item() - got[0].item()) > 1e-3  # ST drops the anchor's own negatives from d2d
    finally:
        bert_st.train()


def test_matryoshka_loss_wrapping_the_fused_loss(bert_st):
    """MatryoshkaLoss(model, CachedFusedMNRLoss(model), dims), the usual way to add Matryoshka to a cached
    loss, equals MatryoshkaLoss over sentence-transformers' cached loss (the dims join the one pass)."""
    MatryoshkaLoss = st_loss_class("MatryoshkaLoss")

    feats = features(bert_st, [TEXTS[:5], TEXTS[5:10], TEXTS[10:15]])
    dims, weights = [64, 32, 8], [1.0, 0.5, 0.25]
    want = run(MatryoshkaLoss(bert_st, st_cached_mnrl(bert_st, mini_batch_size=2), dims,
                              matryoshka_weights=weights), bert_st, feats, 12)
    ours = fused(bert_st, mini_batch_size=2)
    assert ours.uses_gradient_cache
    got = run(MatryoshkaLoss(bert_st, ours, dims, matryoshka_weights=weights), bert_st, feats, 12)
    assert_same(got, want)
    assert ours.matryoshka_dims == (8, 32, 64) and ours.matryoshka_weights == (0.25, 0.5, 1.0)
    with pytest.raises(ValueError, match="already has matryoshka_dims"):
        MatryoshkaLoss(bert_st, CachedFusedMNRLoss(bert_st, matryoshka_dims=[8, 64]), dims)
    with pytest.raises(TypeError, match="calculate_loss"):
        CachedFusedMNRLoss(bert_st).calculate_loss = lambda reps: 0.0


def test_matryoshka_n_dims_per_step_draws_the_same_dims(bert_st):
    """MatryoshkaLoss(n_dims_per_step=1) samples indices into its dims listed largest first: for the same
    Python random seed, the fused loss trains the dim sentence-transformers' cached loss trains (5.1's
    MatryoshkaLoss does not hand n_dims_per_step to a cached loss: every dim, in both)."""
    import random

    MatryoshkaLoss = st_loss_class("MatryoshkaLoss")

    feats = features(bert_st, [TEXTS[:5], TEXTS[5:10]])
    dims = [64, 32, 8]
    for seed in range(4):
        random.seed(seed)
        st_loss = MatryoshkaLoss(bert_st, st_cached_mnrl(bert_st, mini_batch_size=2), dims, n_dims_per_step=1)
        want = run(st_loss, bert_st, feats, 5)
        random.seed(seed)
        ours = fused(bert_st, mini_batch_size=2)
        got = run(MatryoshkaLoss(bert_st, ours, dims, n_dims_per_step=1), bert_st, feats, 5)
        assert_same(got, want)
        assert ours.n_dims_per_step == (-1 if st_old_layout() else 1)  # before 5.4: every dim each step


def test_flattened_features():
    """Padding-free features (cu_seq_lens_q, as sentence-transformers builds them for flash-attention) are
    split into mini-batches by sequence, as sentence-transformers' own cached loss splits them."""
    import inspect

    from transformers import DataCollatorWithFlattening

    if "return_seq_idx" not in inspect.signature(DataCollatorWithFlattening.__init__).parameters:
        pytest.skip("this transformers' DataCollatorWithFlattening has no return_seq_idx (4.51; 4.52 has it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_st_model(cached_tiny_model_dir("qwen2"), "lasttoken", normalize=True)
    model.train()
    tr = model[0]
    if not hasattr(tr, "can_flatten_inputs"):
        pytest.skip("this sentence-transformers version does not flatten inputs")
    tr.can_flatten_inputs = True  # what flash_attention_2 turns on (not available on CPU)
    tr.data_collator = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True,
                                                  return_position_ids=True)
    tr._flatten_position_offset = 0
    feats = [dict(model.preprocess(c)) for c in (TEXTS[:5], TEXTS[5:10], TEXTS[10:15])]
    assert "cu_seq_lens_q" in feats[0] and feats[0]["input_ids"].shape[0] == 1
    want = run(st_cached_mnrl(model, mini_batch_size=2), model, feats, 13)
    got = run(CachedFusedMNRLoss(model, mini_batch_size=2), model, feats, 13)
    assert_same(got, want)
    if not ST_TOKEN_BUDGET:
        return
    # token-budget mini-batches of flattened features: packed by sequence lengths from cu_seq_lens_q
    budget = int((feats[0]["cu_seq_lens_q"][1:] - feats[0]["cu_seq_lens_q"][:-1]).max()) + 3
    want = run(st_cached_mnrl(model, mini_batch_size=2, mini_batch_num_tokens=budget), model, feats, 14)
    got = run(CachedFusedMNRLoss(model, mini_batch_size=2, mini_batch_num_tokens=budget), model, feats, 14)
    assert_same(got, want)


def test_positional_arguments_follow_sentence_transformers(bert_st):
    """CachedMultipleNegativesRankingLoss's positional order (sentence-transformers 6): mini_batch_num_tokens
    is the 5th, gather_across_devices the 6th; directions / partition_mode map to symmetric / same_tower."""
    from sentence_transformers import util

    loss = CachedFusedMNRLoss(bert_st, 20.0, util.cos_sim, 16, None, False)
    assert (loss.mini_batch_size, loss.gather_across_devices) == (16, False)
    assert CachedFusedMNRLoss(bert_st, directions=("query_to_doc", "doc_to_query"),
                              partition_mode="per_direction").symmetric
    assert CachedFusedMNRLoss(bert_st, directions=("query_to_doc", "query_to_query", "doc_to_doc")).same_tower
    assert CachedFusedMNRLoss(bert_st, 20.0, util.cos_sim, 16, 4096).mini_batch_num_tokens == 4096
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="mini_batch_num_tokens"):
            CachedFusedMNRLoss(bert_st, 20.0, util.cos_sim, 16, bad)
    with pytest.raises(ValueError, match="directions"):
        CachedFusedMNRLoss(bert_st, directions=("query_to_doc", "doc_to_query"))  # joint: not expressed
    with pytest.raises(ValueError, match="hardness_mode"):
        CachedFusedMNRLoss(bert_st, hardness_mode="hard_negatives", hardness_strength=1.0)
    with pytest.warns(UserWarning, match="no effect with hardness_strength=0") as rec:  # a no-op, as in ST
        CachedFusedMNRLoss(bert_st, hardness_mode="hard_negatives", hardness_strength=0.0)
    assert rec[0].filename == __file__


def test_sort_by_length_same_loss_and_gradients_without_dropout(bert_st):
    """sort_by_length=True forms the mini-batches longest first: without dropout (eval mode) the loss and
    gradients still equal sentence-transformers' (only dropout masks depend on the mini-batches)."""
    feats = features(bert_st, [TEXTS[:9], TEXTS[9:18], TEXTS[18:27]])
    lengths = feats[0]["attention_mask"].sum(1).tolist()
    assert lengths != sorted(lengths, reverse=True)  # the rows are reordered
    bert_st.eval()
    try:
        want = run(st_cached_mnrl(bert_st, scale=20.0, mini_batch_size=2), bert_st, feats, 11)
        loss = CachedFusedMNRLoss(bert_st, scale=20.0, mini_batch_size=2, sort_by_length=True)
        assert loss.get_config_dict()["sort_by_length"] is True
        assert_same(run(loss, bert_st, feats, 11), want)
    finally:
        bert_st.train()


@pytest.mark.skipif(not ST_TOKEN_BUDGET, reason="this sentence-transformers' cached MNRL has no "
                    "mini_batch_num_tokens (token-budget mini-batches)")
@pytest.mark.parametrize("budget", [7, 40, 100])
def test_mini_batch_num_tokens_matches_sentence_transformers(bert_st, budget):
    """Token-budget mini-batches (sentence-transformers 6's mini_batch_num_tokens), dropout on: the same
    packing (consecutive rows while their attended tokens fit, a longer row alone), hence the same masks,
    loss and gradients; budget 7 is below most rows' length (each runs alone)."""
    feats = features(bert_st, [TEXTS[:7], TEXTS[7:14], TEXTS[14:21]])
    lengths = feats[0]["attention_mask"].sum(1).tolist()
    assert min(lengths) < 40 < sum(lengths)  # the budgets give mini-batches of several sizes
    want = run(st_cached_mnrl(bert_st, mini_batch_size=3, mini_batch_num_tokens=budget), bert_st, feats, 15)
    loss = CachedFusedMNRLoss(bert_st, mini_batch_size=3, mini_batch_num_tokens=budget)
    got = run(loss, bert_st, feats, 15)
    assert_same(got, want)


@pytest.mark.skipif(not ST_DIRECTIONS or not ST_GRADCACHE,
                    reason="directions= as sentence-transformers 5.7 / 6 define them")
def test_settings_assigned_after_construction_take_effect(bert_st):
    """sentence-transformers reads directions / partition_mode / similarity_fct / hardness_* at every step,
    and its 6.x loss forwards assignments to them: here an assignment was stored and never read (the
    symmetric loss stayed the one-direction loss), and reading them raised AttributeError."""
    feats = features(bert_st, [TEXTS[:6], TEXTS[6:12]])
    for directions, mode in ((("query_to_doc", "doc_to_query"), "per_direction"),
                             (("query_to_doc", "query_to_query", "doc_to_doc"), "joint")):
        st, ours = st_cached_mnrl(bert_st, mini_batch_size=4), fused(bert_st, mini_batch_size=4)
        for loss in (st, ours):
            loss.directions, loss.partition_mode = directions, mode
        assert (ours.directions, ours.partition_mode) == (directions, mode)
        assert_same(run(ours, bert_st, feats, 9), run(st, bert_st, feats, 9))
    from sentence_transformers import util

    ours = fused(bert_st, mini_batch_size=4)
    assert ours.similarity_fct is util.cos_sim and ours.hardness_strength == 0 and ours.hardness_mode is None
    ours.similarity_fct = util.cos_sim
    with pytest.raises(ValueError, match="similarity_fct"):
        ours.similarity_fct = util.dot_score
    with pytest.raises(ValueError, match="hardness"):
        ours.hardness_strength = 0.5
    with pytest.raises(ValueError, match="not expressed"):
        ours.directions = ("query_to_doc", "doc_to_query", "query_to_query")
    ours.directions = ("query_to_doc", "doc_to_query")  # joint: no fused form; refused when a step reads it
    with pytest.raises(ValueError, match="not expressed"):
        run(ours, bert_st, feats, 9)
