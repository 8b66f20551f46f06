"""Exact top-k search over codes: hamming_topk and int8_topk against numpy brute force (and faiss),
at every SIMD level, on both parallel strategies, with ties; clear errors on bad input."""

import numpy as np
import pytest
import torch

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
from llmembed_fast import _ext, quant  # noqa: E402

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
LEVELS = ["scalar", "avx2", "avx512"]


@pytest.fixture(params=LEVELS[: LEVELS.index(_ext.extension().build_info()["simd_detected"]) + 1])
def simd(request):
    _ext.extension().set_simd(request.param)
    yield request.param
    _ext.extension().set_simd("avx512")


def hamming_reference(q, d, k):
    dist = POPCOUNT[np.bitwise_xor(q.view(np.uint8)[:, None, :], d.view(np.uint8)[None, :, :])].sum(-1)
    order = np.stack([np.lexsort((np.arange(d.shape[0]), row)) for row in dist])[:, :k]
    return np.take_along_axis(dist, order, 1), order


def codes(rng, n, nb, ties=False, duplicates=False):
    c = rng.integers(0, 256, (n, nb), dtype=np.uint8)
    c = c & 0x11 if ties else c
    if duplicates:  # about a third of the rows repeat an earlier row: equal distances, ranked by lower index
        for j in range(1, n):
            if rng.random() < 0.35:
                c[j] = c[rng.integers(0, j)]
    return c


# Every length class of the fused scans: under one 32-byte chunk, whole 32/64-byte chunks, masked tails,
# the lengths of common embedders (384 -> 48, 768 -> 96, 896 -> 112, 2560 -> 320, 3584 -> 448,
# 4096 dims -> 512 bytes), past the unrolled forms (520, 600), past the 16-bit distance limit (8192).
SIZES = [1, 2, 7, 13, 16, 31, 32, 33, 48, 63, 65, 96, 112, 128, 130, 160, 320, 448, 512, 520, 600]


@pytest.mark.parametrize("nb", SIZES)
def test_hamming_matches_brute_force(nb, simd):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        ties, dups = seed == 2, seed == 3
        q, d = codes(rng, 4, nb, ties), codes(rng, 301, nb, ties, dups)  # 301: not a multiple of 8
        for k in (1, 7, 301):
            dist, idx = quant.hamming_topk(q, d, k)
            want_d, want_i = hamming_reference(q, d, k)
            assert dist.dtype == np.int32 and idx.dtype == np.int64
            np.testing.assert_array_equal(dist, want_d)
            np.testing.assert_array_equal(idx, want_i)


def test_hamming_past_the_fused_length_limit(simd):
    """Distances over 65535 bits (codes over 8191 bytes) leave the scans' 16-bit fields: the row path."""
    rng = np.random.default_rng(9)
    for nb in (8191, 8192):
        q, d = codes(rng, 2, nb), codes(rng, 21, nb, duplicates=True)
        q[0], d[3] = 0, 255  # one distance of every bit
        dist, idx = quant.hamming_topk(q, d, 21)
        want_d, want_i = hamming_reference(q, d, 21)
        np.testing.assert_array_equal(dist, want_d)
        np.testing.assert_array_equal(idx, want_i)


@pytest.mark.parametrize("nb", [16, 48, 112, 128, 520])
def test_hamming_large_corpus_split_over_threads(nb, simd):
    """Enough documents that every thread scans its own slice; per-slice results are merged."""
    rng = np.random.default_rng(5)
    torch.set_num_threads(2)
    for ties in (False, True):
        q, d = codes(rng, 3, nb, ties), codes(rng, 9001, nb, ties, duplicates=ties)
        dist, idx = quant.hamming_topk(torch.from_numpy(q), torch.from_numpy(d), 10)
        want_d, want_i = hamming_reference(q, d, 10)
        np.testing.assert_array_equal(dist.numpy(), want_d)
        np.testing.assert_array_equal(idx.numpy(), want_i)


def test_hamming_signed_binary_equals_unsigned():
    rng = np.random.default_rng(1)
    x, y = (
        rng.standard_normal((5, 100)).astype(np.float32),
        rng.standard_normal((200, 100)).astype(np.float32),
    )
    a = quant.hamming_topk(quant.quantize(x, "binary"), quant.quantize(y, "binary"), 5)
    b = quant.hamming_topk(quant.quantize(x, "ubinary"), quant.quantize(y, "ubinary"), 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_hamming_matches_faiss():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    q, d = codes(rng, 20, 128), codes(rng, 5000, 128)
    index = faiss.IndexBinaryFlat(1024)
    index.add(d)
    fd, fi = index.search(q, 10)
    dist, idx = quant.hamming_topk(q, d, 10)
    np.testing.assert_array_equal(dist, fd)
    # faiss orders equal distances arbitrarily: compare ids below the k-th distance as sets
    for r in range(len(q)):
        below = dist[r] < dist[r, -1]
        assert set(idx[r][below]) == set(fi[r][fd[r] < fd[r, -1]])


def int8_reference(q, c, ranges, k):
    step = (ranges[1].astype(np.float64) - ranges[0]) / 255
    u = c.astype(np.int64) + (128 if c.dtype == np.int8 else 0)
    deq = ranges[0].astype(np.float64) + (u + 0.5) * step
    s = q.astype(np.float64) @ deq.T
    order = np.stack([np.lexsort((np.arange(c.shape[0]), -row)) for row in s])[:, :k]
    return np.take_along_axis(s, order, 1), order, s


@pytest.mark.parametrize("d", [5, 64, 100, 384])
@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_int8_topk_matches_brute_force(d, precision, simd):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        docs = rng.standard_normal((400, d)).astype(np.float32)
        queries = rng.standard_normal((5, d)).astype(np.float32)
        ranges = quant.calibrate(docs)
        c = quant.quantize(docs, precision, ranges=ranges)
        if seed == 2:
            c[100:200] = c[0]  # exact duplicates: ties must go to the lower index
        for k in (1, 10, 400):
            s, idx = quant.int8_topk(queries, c, ranges, k)
            want_s, want_i, full = int8_reference(queries, c, ranges, k)
            assert s.dtype == np.float32 and idx.dtype == np.int64
            np.testing.assert_allclose(s, want_s.astype(np.float32), rtol=1e-6, atol=1e-5)
            # ids equal except where float64 summation order could swap two scores closer than 1e-9
            np.testing.assert_allclose(np.take_along_axis(full, idx, 1), want_s, rtol=0, atol=1e-9)
            mismatch = idx != want_i
            if mismatch.any():
                gaps = np.abs(np.take_along_axis(full, idx, 1) - want_s)[mismatch]
                assert gaps.max() < 1e-9


def test_int8_topk_large_corpus_and_float64_queries(simd):
    rng = np.random.default_rng(9)
    torch.set_num_threads(2)
    docs = rng.standard_normal((9000, 96)).astype(np.float32)
    ranges = quant.calibrate(docs)
    c = quant.quantize(docs, "int8", ranges=ranges)
    q = rng.standard_normal((3, 96))
    s, idx = quant.int8_topk(torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(ranges), 10)
    want_s, want_i, _ = int8_reference(q, c, ranges, 10)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-6)


def test_search_errors():
    rng = np.random.default_rng(0)
    q, d = codes(rng, 2, 16), codes(rng, 10, 16)
    with pytest.raises(ValueError, match="k must be in"):
        quant.hamming_topk(q, d, 11)
    with pytest.raises(ValueError, match="k must be in"):
        quant.hamming_topk(q, d, 0)
    with pytest.raises(ValueError, match="empty"):
        quant.hamming_topk(q, d[:0], 1)
    with pytest.raises(ValueError, match="mismatch"):
        quant.hamming_topk(q[:, :8], d, 1)
    with pytest.raises(TypeError, match="query_codes"):
        quant.hamming_topk(q.astype(np.float32), d, 1)
    with pytest.raises(TypeError, match="same precision"):
        quant.hamming_topk(q.view(np.int8), d, 1)
    with pytest.raises(TypeError, match="k must be an int"):
        quant.hamming_topk(q, d, 2.0)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    r = quant.calibrate(x)
    c = quant.quantize(x, "int8", ranges=r)
    with pytest.raises(ValueError, match="mismatch"):
        quant.int8_topk(x[:, :4], c, r, 1)
    with pytest.raises(TypeError, match="doc_codes"):
        quant.int8_topk(x, x, r, 1)
    with pytest.raises(TypeError, match="queries"):
        quant.int8_topk(c, c, r, 1)
    with pytest.raises(ValueError, match="ranges"):
        quant.int8_topk(x, c, r[:, :4], 1)
    with pytest.raises(ValueError, match="k must be in"):
        quant.int8_topk(x, c, r, 11)
    for bad in (np.nan, np.inf):  # a non-finite query or range would make every bound NaN
        xb = x.copy()
        xb[0, 3] = bad
        with pytest.raises(ValueError, match="queries must be finite"):
            quant.int8_topk(xb, c, r, 3)
        rb = r.copy()
        rb[1, 2] = bad
        with pytest.raises(ValueError, match="ranges must be finite"):
            quant.int8_topk(x, c, rb, 3)
    w = torch.zeros(1, 8, dtype=torch.float64)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):  # the op itself, called directly
        _ext.ops().int8_topk(w, torch.from_numpy(c), 3)
    # finite weights whose scores overflow float64 (the Python layer rescales queries, a direct call may not):
    # an inf score made the bounds NaN and the ids came back at random
    w = torch.full((1, 8), 1e306, dtype=torch.float64)
    with pytest.raises(ValueError, match="overflow"):
        _ext.ops().int8_topk(w, torch.from_numpy(c), 3)


def test_meta_shapes():
    ops = _ext.ops()
    q = torch.empty(3, 16, dtype=torch.uint8, device="meta")
    d = torch.empty(100, 16, dtype=torch.uint8, device="meta")
    dist, idx = ops.hamming_topk(q, d, 5)
    assert dist.shape == (3, 5) and dist.dtype == torch.int32 and idx.dtype == torch.int64


def test_meta_kernels_check_like_the_cpu_ones_and_refuse_mixed_devices():
    """The Meta kernels (FakeTensor / torch.compile) run the CPU kernels' checks, and a call mixing CPU and
    meta tensors is refused (it returned uninitialised CPU tensors: leaked heap values as indices)."""
    ops = _ext.ops()
    q, d = torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(10, 16, dtype=torch.uint8)
    w = torch.zeros(2, 16, dtype=torch.float64)
    cases = [
        (lambda: ops.hamming_topk(q, d.to("meta"), 5), ValueError, "every tensor must be on"),
        (lambda: ops.hamming_topk(q.to("meta"), d.to("meta"), 100), ValueError, "k must be in"),
        (lambda: ops.hamming_topk(q.to("meta"), d[:, :8].to("meta"), 2), ValueError, "columns"),
        # ubinary queries against binary docs: every byte's top bit flipped on one side (the op accepted it)
        (lambda: ops.hamming_topk(q, d.view(torch.int8), 2), TypeError, "same code type"),
        (lambda: ops.hamming_topk(q.to("meta"), d.view(torch.int8).to("meta"), 2), TypeError,
         "same code type"),
        (lambda: ops.int8_topk(w.float().to("meta"), d.view(torch.int8).to("meta"), 3), TypeError, "float64"),
        (lambda: ops.int8_topk(w, d.view(torch.int8).to("meta"), 3), ValueError, "every tensor must be on"),
        (lambda: ops.pack_bits(torch.zeros(2, 8, dtype=torch.int32, device="meta")), TypeError, "float32"),
        (lambda: ops.quantize_scalar(torch.zeros(2, 3), torch.zeros(3, device="meta"),
                                     torch.ones(3, device="meta"), True), ValueError,
         "every tensor must be on"),
        (lambda: ops.score_rows(w, d.to("meta"), torch.zeros(2, 3, dtype=torch.long)), ValueError,
         "every tensor must be on"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_plain_torch_fallbacks_match_the_ops():
    """The paths used on devices without compiled kernels (e.g. a GPU build without CUDA ops)."""
    from llmembed_fast.quant.codes import _pack_bits_torch, _quantize_scalar_torch, scalar_params
    from llmembed_fast.quant.search import _hamming_topk_torch, _int8_topk_torch, fold_query, unfold_scores

    rng = np.random.default_rng(3)
    for ties, budget in ((False, 1 << 22), (True, 1 << 22), (True, 48 * 1500), (False, 48 * 2500)):
        q, d = codes(rng, 7, 48, ties), codes(rng, 5000, 48, ties)  # small budgets: blocks of queries too
        got = _hamming_topk_torch(torch.from_numpy(q), torch.from_numpy(d), 17, budget=budget)
        want = quant.hamming_topk(q, d, 17)
        np.testing.assert_array_equal(got[0].numpy(), want[0])
        np.testing.assert_array_equal(got[1].numpy(), want[1])
    x = rng.standard_normal((300, 37)).astype(np.float32)
    np.testing.assert_array_equal(_pack_bits_torch(torch.from_numpy(x)).numpy(), quant.quantize(x, "ubinary"))
    r = quant.calibrate(x[:100])
    for dt in (np.float32, np.float64):
        s, t = scalar_params(r.astype(dt), np.dtype(dt))
        got = _quantize_scalar_torch(
            torch.from_numpy(x.astype(dt)), torch.from_numpy(s), torch.from_numpy(t), True
        )
        np.testing.assert_array_equal(got.numpy(), quant.quantize(x.astype(dt), "int8", ranges=r.astype(dt)))
    c = quant.quantize(x, "int8", ranges=r)
    w, bias, exp = fold_query(torch.from_numpy(x[:4]), torch.from_numpy(r))
    s, idx = _int8_topk_torch(w, torch.from_numpy(c), 9, budget=64 * 60)
    want_s, want_i = quant.int8_topk(x[:4], c, r, 9)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(unfold_scores(s + bias[:, None], exp).numpy(), want_s, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_plain_torch_int8_topk_ranks_duplicates_by_index(seed):
    """Equal codes score equal wherever their rows sit (a BLAS matmul rounds rows by position), so the
    fallback ranks duplicates by index, as the extension does; its scores match to float64 rounding."""
    from llmembed_fast.quant.search import _int8_topk_torch, fold_query, unfold_scores

    rng = np.random.default_rng(seed)
    for n, d in ((257, 31), (1000, 67), (40, 1)):
        emb = rng.standard_normal((n, d)).astype(np.float32)
        emb[rng.integers(0, n, size=n // 2)] = emb[rng.integers(0, n, size=n // 2)]
        qs = emb[:5] + 0.05 * rng.standard_normal((5, d)).astype(np.float32)
        r = quant.calibrate(emb)
        c = quant.quantize(emb, "int8", ranges=r)
        k = int(rng.integers(1, n + 1))
        want_s, want_i = quant.int8_topk(qs, c, r, k)
        w, bias, exp = fold_query(torch.from_numpy(qs), torch.from_numpy(r))
        s, idx = _int8_topk_torch(w, torch.from_numpy(c), k, budget=int(rng.integers(100, 20_000)))
        np.testing.assert_array_equal(idx.numpy(), want_i)
        got_s = unfold_scores(s + bias[:, None], exp).numpy()
        np.testing.assert_allclose(got_s, want_s, rtol=1e-6, atol=1e-6)


def test_ops_release_the_gil():
    """While a search runs in another thread, Python code in this thread keeps running."""
    import threading
    import time

    rng = np.random.default_rng(4)
    d = torch.from_numpy(codes(rng, 300_000, 128))
    q = torch.from_numpy(codes(rng, 64, 128))
    done = threading.Event()
    th = threading.Thread(target=lambda: (quant.hamming_topk(q, d, 5), done.set()))
    t0 = time.perf_counter()
    th.start()
    ticks = 0
    while not done.is_set():
        ticks += 1
    th.join()
    if time.perf_counter() - t0 < 0.01:
        pytest.skip("the search finished too fast to tell")
    assert ticks > 100  # with the GIL held, this loop could not run until the search had finished


@pytest.mark.parametrize("scale", [1e-160, 1e-200, 1e-290, 1e-310, 1e250, 1e300])
def test_int8_topk_tiny_and_huge_queries(scale):
    """Finite queries of any magnitude: the error bounds must neither underflow nor overflow (tiny ones used
    to give wrong rankings, then unset ids)."""
    rng = np.random.default_rng(0)
    for n, d in ((50, 64), (3000, 17)):
        c = rng.integers(-128, 128, (n, d), dtype=np.int8)
        ranges = np.vstack([-np.ones(d), np.ones(d)])
        q = rng.standard_normal((3, d)) * scale
        step = (ranges[1] - ranges[0]) / 255
        ref = (q / scale) @ (ranges[0] + ((c.view(np.uint8) ^ 0x80) + 0.5) * step).T  # same ranking
        for k in (1, 5, n):
            _, ids = quant.int8_topk(q, c, ranges, k)
            np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :k])


def test_int8_topk_huge_and_tiny_queries_keep_the_ranking():
    """Ranking is invariant to the query's scale: each query is scaled by a power of two before its weights
    are folded, so finite queries near float64's limits neither overflow nor lose the order; the scores
    come back at the query's own scale (float32: inf where they exceed it)."""
    rng = np.random.default_rng(0)
    c = rng.integers(-128, 128, (50, 64), dtype=np.int8)
    ranges = np.vstack([-np.ones(64), np.ones(64)])
    q1 = rng.standard_normal((3, 64))
    s1, ids1 = quant.int8_topk(q1, c, ranges, 5)
    for scale in (1e-300, 1e-30, 1e30, 1e300, 1e307):
        s, ids = quant.int8_topk(q1 * scale, c, ranges, 5)
        np.testing.assert_array_equal(ids, ids1, err_msg=f"scale {scale:g}")
        want = s1.astype(np.float64) * scale
        big = np.abs(want) >= np.finfo(np.float32).max
        small = np.abs(want) < np.finfo(np.float32).tiny
        fits = ~big & ~small
        np.testing.assert_allclose(s[fits], want[fits], rtol=1e-6, atol=0)
        assert (np.isinf(s[big]) & (np.sign(s[big]) == np.sign(want[big]))).all()
        assert (np.abs(s[small]) <= np.finfo(np.float32).tiny).all()


def test_int8_topk_ranges_too_wide_name_ranges():
    c = np.zeros((4, 8), np.int8)
    wide = np.vstack([np.full(8, -1e308), np.full(8, 1e308)])
    with pytest.raises(ValueError, match="ranges are too wide"):
        quant.int8_topk(np.ones((1, 8)), c, wide, 2)


def test_cpu_without_the_extension_uses_the_torch_paths(monkeypatch):
    """Without llmembed_fast._C (a build with LLMEMBED_FAST_NO_EXT=1, or one for another torch), every quant
    function and Index runs its plain-torch path on the CPU, with a warning, and gives the extension's
    codes and rankings (it raised before)."""
    import warnings

    rng = np.random.default_rng(11)
    docs = rng.standard_normal((700, 45)).astype(np.float32)
    docs[650:] = docs[100:150]  # duplicates rank by index on both paths
    queries = rng.standard_normal((9, 45)).astype(np.float32)
    queries[:3] = docs[100:103] + 0.01
    ranges = quant.calibrate(docs)

    def everything():
        out = {p: quant.quantize(docs, p, ranges=ranges if p.endswith("int8") else None)
               for p in ("int8", "uint8", "binary", "ubinary")}
        out.update({f"{p} of 0 rows": quant.quantize(docs[:0], p, ranges=ranges if p == "int8" else None)
                    for p in ("int8", "binary", "ubinary")})
        out["index, 0 queries"] = quant.Index(45).add(docs).search(queries[:0], 3)
        out["f16"] = quant.quantize(docs.astype(np.float16), "int8")
        out["hamming"] = quant.hamming_topk(quant.quantize(queries, "binary"), out["binary"], 7)
        out["int8"] = quant.int8_topk(queries, out["int8"], ranges, 7)
        for precision, rescore in (("binary", None), ("binary", "int8"), ("binary", "float"),
                                   ("int8", "float")):
            index = quant.Index(45, precision, rescore, ranges=ranges).add(docs)
            out[f"index {precision} {rescore}"] = index.search(queries, 5, rescore_multiplier=3)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = everything()
    monkeypatch.setattr(_ext, "extension", lambda: None)
    monkeypatch.setattr(_ext, "load_error", lambda: "simulated: not built")
    def no_ops():
        raise AssertionError("the extension was called")

    monkeypatch.setattr(_ext, "ops", no_ops)
    from llmembed_fast.quant import _args

    monkeypatch.setattr(_args, "_FALLBACK_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = everything()
    fallback = [w for w in caught if "plain-torch" in str(w.message)]
    assert len(fallback) == 1 and fallback[0].category is RuntimeWarning  # once per process, not per call
    assert fallback[0].filename == __file__  # the caller's line, not torch's or the package's wrappers
    for key, value in want.items():
        if isinstance(value, tuple):  # (scores or distances, ids)
            np.testing.assert_array_equal(got[key][1], value[1], err_msg=key)
            np.testing.assert_allclose(got[key][0], value[0], rtol=1e-6, atol=0, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_int8_topk_names_the_dimension_limit():
    """D = 65,537 is refused by the Python layer, naming doc_codes (the op's own message is another)."""
    q = np.zeros((1, 65537), np.float32)
    c = np.zeros((2, 65537), np.int8)
    r = np.stack([np.zeros(65537, np.float32), np.ones(65537, np.float32)])
    with pytest.raises(ValueError, match="doc_codes: at most 65536 dimensions"):
        quant.int8_topk(q, c, r, 1)


def test_k_zero_is_refused_without_the_extension(monkeypatch):
    """k = 0 is refused by the argument check itself: the plain-torch path has no op to refuse it."""
    from llmembed_fast.quant import _args

    monkeypatch.setattr(_ext, "extension", lambda: None)
    monkeypatch.setattr(_ext, "load_error", lambda: "simulated: not built")
    monkeypatch.setattr(_args, "_FALLBACK_WARNED", True)
    rng = np.random.default_rng(0)
    q, d = rng.integers(0, 256, (2, 4), dtype=np.uint8), rng.integers(0, 256, (5, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="k must be in"):
        quant.hamming_topk(q, d, 0)
