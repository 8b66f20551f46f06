"""Batch slicing for gradient caching: trimmed chunk widths (one host transfer per batch) and slice_batch."""

from __future__ import annotations

import pytest
import torch

from llmembed_fast.training import chunking
from llmembed_fast.training.chunking import batch_size, chunk_ranges, chunk_widths, slice_batch


def _width_ref(mask: torch.Tensor, lo: int, hi: int):
    used = mask[lo:hi].ne(0).any(0).nonzero()
    if used.numel() == 0:
        return None
    w = int(used.max()) + 1
    return w if w < mask.shape[1] else None


def test_chunk_widths_match_per_chunk_reference():
    g = torch.Generator().manual_seed(0)
    for seed in range(5):
        n, L = 23, 17
        lengths = torch.randint(0, L + 1, (n,), generator=g)
        right = (torch.arange(L)[None] < lengths[:, None]).long()
        left = right.flip(1)
        holes = right * (torch.rand(n, L, generator=g) > 0.3).long()
        for mask in (right, left, holes, torch.zeros(n, L, dtype=torch.long),
                     torch.ones(n, L, dtype=torch.long)):
            for chunk in (1, 4, 7, n):
                ranges = chunk_ranges(n, chunk)
                want = [_width_ref(mask, lo, hi) for lo, hi in ranges]
                assert chunk_widths({"attention_mask": mask}, ranges) == want, (seed, chunk)


def test_slice_batch_trims_trailing_padding_only():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    ids = torch.arange(15).view(3, 5)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 2, 3]), "flag": 7}
    part = slice_batch(batch, 0, 2, trim_padding=True)
    assert part["input_ids"].tolist() == [[0, 1, 2], [5, 6, 7]]
    assert part["attention_mask"].shape == (2, 3) and part["labels"].tolist() == [1, 2] and part["flag"] == 7
    # left-padded row keeps all
    assert slice_batch(batch, 1, 3, trim_padding=True)["input_ids"].shape == (2, 5)
    assert slice_batch(batch, 0, 2)["input_ids"].shape == (2, 5)  # no trimming unless asked
    assert slice_batch(batch, 0, 2, trim_padding=True, width=4)["input_ids"].shape == (2, 4)  # precomputed
    assert slice_batch(batch, 0, 2, trim_padding=False, width=3)["input_ids"].shape == (2, 5)
    assert torch.equal(slice_batch(ids, 1, 3, trim_padding=True), ids[1:3])  # a tensor batch: rows only
    assert chunk_widths(ids, [(0, 3)]) == [None]


def test_prompt_length_is_batch_metadata():
    """sentence-transformers' prompt_length: a one-element tensor (a map-style Dataset's collation) is one
    value for the whole batch, not a batch of one; one value per row is split with the rows."""
    ids = torch.arange(12).view(4, 3)
    one = {"input_ids": ids, "prompt_length": torch.tensor([2])}
    assert batch_size(one) == 4
    assert slice_batch(one, 2, 4)["prompt_length"].tolist() == [2]
    rows = {"input_ids": ids, "prompt_length": torch.tensor([2, 2, 2, 2])}
    assert batch_size(rows) == 4 and slice_batch(rows, 1, 3)["prompt_length"].tolist() == [2, 2]
    with pytest.raises(ValueError, match="disagree"):
        batch_size({"input_ids": ids, "prompt_length": torch.tensor([2, 2])})
    with pytest.raises(ValueError, match="disagree"):  # other one-element tensors stay per-row fields
        batch_size({"input_ids": ids, "labels": torch.tensor([2])})


def test_grad_cache_computes_widths_once_per_tower(monkeypatch):
    import llmembed_fast as lf
    from llmembed_fast.training import GradCache
    from llmembed_fast.training import grad_cache as gc_mod

    calls = []
    real = chunking.chunk_widths

    def spy(batch, ranges, ends=None):
        calls.append(len(ranges))
        return real(batch, ranges, ends)

    monkeypatch.setattr(gc_mod, "chunk_widths", spy)
    seen = []
    emb = torch.nn.Embedding(50, 8)

    def encoder(b):
        seen.append(b["input_ids"].shape[1])
        m = b["attention_mask"].unsqueeze(-1).float()
        return (emb(b["input_ids"]) * m).sum(1) / m.sum(1).clamp_min(1)

    lengths = torch.tensor([2, 3, 2, 9, 9, 9, 1, 2])
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 50, (8, 10)) * mask, "attention_mask": mask}
    GradCache(encoder, lf.contrastive_loss, 3, sort_by_length=False).step(batch, batch)
    assert calls == [3, 3]  # one call per tower, covering its three chunks; the replay reuses them
    # pass 1, both towers: trimmed widths 3, 9 (full is 10), 2; the documents' last chunk keeps its graph
    # (reuse_last_chunk) and is not re-run; pass 2 re-runs each tower's chunks but its last, then the last
    # ones
    assert seen == [3, 9, 2] * 2 + [3, 9] + [3] + [2, 9]
    # sorted longest first (the default): rows 3-5 (9 tokens), then 1, 0, 2 (3, 2, 2), then 7, 6 (2, 1); the
    # documents' longest chunk runs last in pass 1, so it is the one kept (not re-run)
    calls.clear()
    seen.clear()
    GradCache(encoder, lf.contrastive_loss, 3).step(batch, batch)
    assert calls == [3, 3] and seen == [9, 3, 2] + [3, 2, 9] + [9, 3] + [3] + [2, 2]


def test_row_ends_longest_first_and_take_rows():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    batch = {"input_ids": torch.arange(20).view(5, 4), "attention_mask": mask,
             "prompt_length": torch.tensor([1]), "nested": {"pool_mask": mask.bool(), "tag": "x"},
             "labels": torch.arange(5)}
    ends = chunking.row_ends(batch)
    assert ends == [2, 4, 0, 3, 4]
    order = chunking.longest_first(ends)
    assert order == [1, 4, 3, 0, 2]  # ties keep their order
    assert chunking.longest_first([4, 4, 4]) is None and chunking.longest_first([3, 2, 2]) is None
    assert chunking.row_ends(torch.ones(3, 4)) is None  # a tensor batch: no lengths
    got = chunking.take_rows(batch, torch.tensor(order))
    torch.testing.assert_close(got["input_ids"], batch["input_ids"][order], rtol=0, atol=0)
    torch.testing.assert_close(got["nested"]["pool_mask"], mask.bool()[order], rtol=0, atol=0)
    torch.testing.assert_close(got["labels"], torch.tensor(order), rtol=0, atol=0)
    assert got["prompt_length"].tolist() == [1] and got["nested"]["tag"] == "x"  # batch metadata unchanged
    assert chunk_widths(got, [(0, 2), (2, 4), (4, 5)], [ends[i] for i in order]) == [None, 3, None]


def test_flattened_batch_is_split_by_sequence():
    """A padding-free batch (cu_seq_lens_q) has one example per sequence; a chunk is its token range with
    the metadata rebuilt (sentence-transformers' flash-attention features)."""
    lens = [3, 1, 4, 2]
    cu = torch.tensor([0, 3, 4, 8, 10], dtype=torch.int32)
    T = 10
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    batch = {"input_ids": torch.arange(T).unsqueeze(0), "position_ids": positions,
             "seq_idx": torch.repeat_interleave(torch.arange(4), torch.tensor(lens))[None],
             "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 4, "max_length_k": 4,
             "modality": "text"}
    assert batch_size(batch) == 4
    part = slice_batch(batch, 1, 3, trim_padding=True)
    assert part["input_ids"].tolist() == [[3, 4, 5, 6, 7]]
    assert part["position_ids"].tolist() == [[0, 0, 1, 2, 3]]
    assert part["seq_idx"].tolist() == [[0, 1, 1, 1, 1]]
    assert part["cu_seq_lens_q"].tolist() == [0, 1, 5] and part["cu_seq_lens_k"].tolist() == [0, 1, 5]
    assert part["max_length_q"] == 4 and part["max_length_k"] == 4 and part["modality"] == "text"
    last = slice_batch(batch, 3, 4)
    assert last["input_ids"].tolist() == [[8, 9]] and last["max_length_q"] == 2
    assert chunk_widths(batch, [(0, 2), (2, 4)]) == [None, None]
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        batch_size({**batch, "cu_seq_lens_q": torch.tensor([[0, 3]])}, "doc_batch")


def test_token_ranges_pack_as_sentence_transformers():
    """chunking.token_ranges packs as sentence-transformers' mini_batch_num_tokens does (compared with its
    own function where it is importable), plus the row cap."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(1, 40, (1,), generator=g))
        counts = torch.randint(0, 30, (n,), generator=g).tolist()
        budget = int(torch.randint(1, 80, (1,), generator=g))
        got = chunking.token_ranges(counts, budget, n)
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))  # contiguous
        for lo, hi in got:
            assert hi - lo == 1 or sum(counts[lo:hi]) <= budget
            assert hi == n or sum(counts[lo:hi + 1]) > budget  # greedy: the next row would not fit
        capped = chunking.token_ranges(counts, budget, 3)
        assert all(hi - lo <= 3 for lo, hi in capped) and capped[-1][1] == n
        try:
            from sentence_transformers.base.losses.gradcache import _minibatch_ranges
        except ImportError:
            continue
        mask = (torch.arange(30)[None] < torch.tensor(counts)[:, None]).long()
        assert got == _minibatch_ranges({"attention_mask": mask}, 1, budget), (counts, budget)
