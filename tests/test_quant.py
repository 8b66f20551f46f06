"""llmembed_fast.quant codes: bit-exact parity with sentence-transformers' quantize_embeddings, calibrate,
dequantize, unpack_bits, every SIMD level of the C++ kernels, clear errors on bad input."""

import numpy as np
import pytest
import torch

from llmembed_fast import _ext

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
import sentence_transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from st_compat import st_quantize_embeddings  # noqa: E402

from llmembed_fast import quant  # noqa: E402

# 6.2 rounds the int8/uint8 ranges to float32 before taking the steps; older versions took them in the
# ranges' dtype (float16 / float64 ranges gave other codes). quant.quantize follows 6.2.
quantize_embeddings = st_quantize_embeddings()
_ST_F32_RANGES = Version(sentence_transformers.__version__).release >= (6, 2)
_ST_OLD_CODES = Version(sentence_transformers.__version__).release < (5, 7)

PRECISIONS = ["int8", "uint8", "binary", "ubinary"]


def st_quantize(x, precision, ranges=None, calibration_embeddings=None):
    """sentence-transformers' quantize_embeddings as 6.2+ computes it: with an older version, the int8/uint8
    ranges (given, or its own min/max calibration) reach it rounded to float32, the one difference. Before
    5.7 it computed other codes (no floor and clip, a zero step divided by, packbits across rows when
    D % 8 != 0): the contract is >= 5.7's, so those versions cannot be the reference."""
    if _ST_OLD_CODES:
        pytest.skip(f"sentence-transformers {sentence_transformers.__version__} < 5.7 computes other codes")
    if _ST_F32_RANGES or not precision.endswith("int8"):
        return quantize_embeddings(x, precision, ranges=ranges, calibration_embeddings=calibration_embeddings)
    if ranges is None:
        src = x if calibration_embeddings is None else calibration_embeddings
        ranges = np.vstack([src.min(0), src.max(0)])
    return quantize_embeddings(x, precision, ranges=np.asarray(ranges).astype(np.float32))


def simd_levels():
    detected = _ext.extension().build_info()["simd_detected"]
    return ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(detected) + 1]


@pytest.fixture(params=simd_levels())
def simd(request):
    C = _ext.extension()
    old = C.build_info()["simd"]
    C.set_simd(request.param)
    yield request.param
    C.set_simd("avx512")  # cap back to what the CPU has
    assert C.build_info()["simd"] == old


def _data(n, d, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, d) + rng.uniform(-1, 1, d)).astype(dtype)
    x[0, : min(d, 3)] = 0  # exact zeros: not positive for binary, bucket edges for int8
    if d > 3:
        x[1, 3] = -0.0
    return x


@pytest.mark.parametrize("d", [8, 13, 384, 1024])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_with_sentence_transformers(d, precision, simd):
    for seed in range(2):
        x = _data(37, d, np.float32, seed)
        calib = _data(200, d, np.float32, seed + 10)
        want = st_quantize(x, precision)
        got = quant.quantize(x, precision)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        want = st_quantize(x, precision, calibration_embeddings=calib)
        np.testing.assert_array_equal(quant.quantize(x, precision, calibration_embeddings=calib), want)
        ranges = np.vstack([calib.min(0), calib.max(0)])
        np.testing.assert_array_equal(quant.quantize(x, precision, ranges=ranges), want)
        # torch in, torch out, same codes
        t = quant.quantize(torch.from_numpy(x), precision, ranges=torch.from_numpy(ranges))
        assert isinstance(t, torch.Tensor)
        np.testing.assert_array_equal(t.numpy(), want)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_parity_other_float_dtypes(dtype, precision):
    """numpy's arithmetic precision is followed: float64 embeddings in float64 (float32 steps), float16
    ones in float32."""
    for seed in range(3):
        x = _data(61, 45, dtype, seed)
        calib = _data(150, 45, dtype, seed + 5)
        np.testing.assert_array_equal(quant.quantize(x, precision), st_quantize(x, precision))
        np.testing.assert_array_equal(
            quant.quantize(x, precision, calibration_embeddings=calib),
            st_quantize(x, precision, calibration_embeddings=calib),
        )
        # mixed: float32 ranges with this dtype's embeddings -> numpy's promotion
        r32 = np.vstack([calib.min(0), calib.max(0)]).astype(np.float32)
        np.testing.assert_array_equal(
            quant.quantize(x, precision, ranges=r32), st_quantize(x, precision, ranges=r32)
        )


def test_under_torch_compile():
    """quantize / int8_topk inside a function compiled by inductor equal eager (they run behind a graph
    break: inductor's float16 steps skipped a rounding and moved codes by 1; its CPU code for the exact
    query folding did not compile)."""
    g = torch.Generator().manual_seed(0)
    x, docs, qs = torch.randn(9, 21, generator=g).half(), torch.randn(30, 21, generator=g), torch.randn(3, 21)
    ranges = quant.calibrate(docs)
    codes = quant.quantize(docs, "int8", ranges=ranges)

    def f(x, qs):
        return quant.quantize(x, "uint8"), quant.quantize(x, "int8", calibration_embeddings=x[:5] * 2), \
            quant.int8_topk(qs, codes, ranges, 4)

    torch._dynamo.reset()
    got, want = torch.compile(f)(x, qs), f(x, qs)
    torch._dynamo.reset()
    for a, b in zip(got[:2] + got[2], want[:2] + want[2], strict=True):
        assert torch.equal(a, b)


def test_custom_ops_opcheck_and_no_silent_gradient():
    """torch.library.opcheck on every op (schema, fake kernels, autograd registration, AOT dispatch); a
    backward through a direct torch.ops call raises naming the op (it silently gave no gradient)."""
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.llmembed_fast
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.int32).to(torch.uint8)  # noqa: E731
    cases = [
        (ops.pack_bits.default, (torch.randn(3, 13, generator=g),)),
        (ops.quantize_scalar.default,
         (torch.randn(3, 13, generator=g), torch.zeros(13), torch.ones(13), True)),
        (ops.hamming_topk.default, (u8(2, 4), u8(9, 4), 3)),
        (ops.int8_topk.default, (torch.randn(2, 16, generator=g, dtype=torch.float64),
                                 u8(9, 16).view(torch.int8), 3)),
        (ops.score_rows.default, (torch.randn(2, 5, generator=g, dtype=torch.float64),
                                  torch.randn(4, 5, generator=g), torch.tensor([[0, 1], [2, 3]]))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out = ops.score_rows(w, torch.randn(4, 5), torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(RuntimeError, match="score_rows is not implemented"):
        out.sum().backward()


def test_zero_width_ranges_and_out_of_range_values():
    x = _data(20, 16, np.float32, 1)
    ranges = np.vstack([x.min(0), x.max(0)])
    ranges[:, 2] = 0.5  # zero step counts as 1
    y = x.copy()
    y[0] = 100.0  # above every max -> 255
    y[1] = -100.0  # below every min -> 0
    for p in ("int8", "uint8"):
        np.testing.assert_array_equal(
            quant.quantize(y, p, ranges=ranges), st_quantize(y, p, ranges=ranges)
        )


def test_bfloat16_quantizes_as_float32():
    x = torch.from_numpy(_data(30, 24, np.float32, 2)).bfloat16()
    want = st_quantize(x.float().numpy(), "int8")
    np.testing.assert_array_equal(quant.quantize(x, "int8").numpy(), want)
    np.testing.assert_array_equal(
        quant.quantize(x, "ubinary").numpy(), st_quantize(x.float().numpy(), "ubinary")
    )


def test_strided_rows_and_float32_passthrough():
    base = torch.from_numpy(_data(40, 50, np.float32, 3))
    x = base[::2, 5:37]  # strided rows, offset columns
    np.testing.assert_array_equal(
        quant.quantize(x, "ubinary").numpy(), st_quantize(x.contiguous().numpy(), "ubinary")
    )
    np.testing.assert_array_equal(
        quant.quantize(x, "int8").numpy(), st_quantize(x.contiguous().numpy(), "int8")
    )
    assert quant.quantize(x.double(), "float32").dtype == torch.float32


def test_calibrate():
    x = _data(33, 9, np.float32, 4)
    r = quant.calibrate(x)
    assert r.dtype == np.float32 and r.shape == (2, 9)
    np.testing.assert_array_equal(r, np.vstack([x.min(0), x.max(0)]))
    assert quant.calibrate(torch.from_numpy(x).double()).dtype == torch.float64
    np.testing.assert_array_equal(quant.quantize(x, "int8", ranges=r), st_quantize(x, "int8"))


def test_dequantize_reconstructs_bucket_middles():
    x = _data(300, 20, np.float64, 5)
    r = quant.calibrate(x)
    for p in ("int8", "uint8"):
        codes = quant.quantize(x, p, ranges=r)
        back = quant.dequantize(codes, r)
        step = (r[1] - r[0]) / 255
        assert back.dtype == np.float32
        assert np.all(
            np.abs(back - x) <= step * 0.5 + 1e-5 + step * (x >= r[1])
        )  # max falls in the last bucket
        u = codes.astype(np.int64) + (128 if p == "int8" else 0)
        np.testing.assert_allclose(back, (r[0] + (u + 0.5) * step).astype(np.float32), rtol=1e-6)
    # max == min: quantize's step there is 1 (as sentence-transformers'), and dequantize reads codes with it
    flat = np.vstack([np.full(3, 2.0), np.full(3, 2.0)])
    vals = np.array([[2.0, 2.7, 9.2], [1.0, 200.0, 300.0]])
    for p in ("int8", "uint8"):
        back = quant.dequantize(quant.quantize(vals, p, ranges=flat), flat)
        np.testing.assert_array_equal(back, np.array([[2.5, 2.5, 9.5], [2.5, 200.5, 257.5]], np.float32))


@pytest.mark.parametrize("d", [1, 8, 13, 100])
def test_unpack_bits_inverts_packing(d):
    x = _data(7, d, np.float32, d)
    for p in ("ubinary", "binary"):
        bits = quant.unpack_bits(quant.quantize(x, p), d)
        np.testing.assert_array_equal(bits, (x > 0).astype(np.uint8))
        np.testing.assert_array_equal(
            bits, np.unpackbits(st_quantize(x, "ubinary"), axis=-1, count=d)
        )


def test_bad_input_errors():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="precision"):
        quant.quantize(x, "int4")
    with pytest.raises(TypeError, match="embeddings"):
        quant.quantize(np.ones((3, 4), np.int8), "int8")
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        quant.quantize(np.ones(4, np.float32), "ubinary")
    with pytest.raises(ValueError, match="ranges"):
        quant.quantize(x, "int8", ranges=np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="ranges"):
        quant.quantize(x, "int8", ranges=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="calibration_embeddings"):
        quant.quantize(x, "int8", calibration_embeddings=np.ones((3, 5), np.float32))
    with pytest.raises(TypeError, match="embeddings"):
        quant.quantize("not an array", "int8")
    with pytest.raises(TypeError, match="codes"):
        quant.dequantize(x, np.ones((2, 4)))
    with pytest.raises(ValueError, match="dim"):
        quant.unpack_bits(np.zeros((2, 2), np.uint8), 20)
    with pytest.raises(ValueError, match="empty"):
        quant.calibrate(np.ones((0, 4), np.float32))
    assert quant.quantize(np.ones((0, 4), np.float32), "int8").shape == (0, 4)
    assert quant.quantize(np.ones((0, 12), np.float32), "binary").shape == (0, 2)


def test_info_names_kernels():
    from llmembed_fast import info

    kernels = info()["extension"]["kernels"]
    assert set(kernels) >= {"hamming", "int8_dot", "pack_bits", "quantize"}


def test_quantize_tensor_requiring_grad():
    x = torch.randn(5, 16, requires_grad=True)
    xd = x.detach()
    for precision in PRECISIONS:
        assert torch.equal(quant.quantize(x, precision), quant.quantize(xd, precision))
    c = torch.randn(7, 16, requires_grad=True)
    for precision in ("int8", "uint8"):
        got = quant.quantize(xd, precision, calibration_embeddings=c)
        assert torch.equal(got, quant.quantize(xd, precision, calibration_embeddings=c.detach()))
        got = quant.quantize(xd, precision, ranges=quant.calibrate(x))
        assert torch.equal(got, quant.quantize(xd, precision, ranges=quant.calibrate(xd)))


def test_negative_strides_and_big_endian_inputs():
    """numpy calls x[::-1] of one row contiguous though its stride is negative; big-endian arrays come from
    .npy files written elsewhere: both are accepted everywhere, with the native results."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    docs = rng.standard_normal((9, 16)).astype(np.float32)
    flipped, big = x[::-1], x.astype(">f4")
    assert flipped.strides[0] < 0 and flipped.flags.c_contiguous
    r = quant.calibrate(docs)
    index = quant.Index(16, "int8", "float").add(docs.astype(">f4"))
    want_index = quant.Index(16, "int8", "float").add(docs)
    for v in (flipped, big):
        for precision in PRECISIONS:
            np.testing.assert_array_equal(
                quant.quantize(v, precision, ranges=r), quant.quantize(x, precision, ranges=r)
            )
        for a, b in zip(index.search(v, 3), want_index.search(x, 3), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(
            quant.int8_topk(v, quant.quantize(docs, "int8", ranges=r), r, 2),
            quant.int8_topk(x, quant.quantize(docs, "int8", ranges=r), r, 2),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        quant.calibrate(docs.astype(">f8")), quant.calibrate(docs.astype(np.float64))
    )
    codes = quant.quantize(docs, "ubinary")
    want = quant.hamming_topk(codes[:1], codes, 3)
    for q in (codes[::-1][-1:], codes[:1].astype(">u1")):
        for a, b in zip(quant.hamming_topk(q, codes, 3), want, strict=True):
            np.testing.assert_array_equal(a, b)
    c8 = quant.quantize(docs, "int8", ranges=r)
    np.testing.assert_array_equal(quant.dequantize(c8, r.astype(">f4")), quant.dequantize(c8, r))
    np.testing.assert_array_equal(quant.unpack_bits(codes[::-1][-1:]), quant.unpack_bits(codes[:1]))


def test_ranges_forms_are_the_same_everywhere():
    """list, numpy array or tensor ranges [2, D] work in quantize, dequantize, int8_topk and Index; a wrong
    shape gives the same message everywhere."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    r = quant.calibrate(x).astype(np.float64)
    c = quant.quantize(x, "int8", ranges=r)
    for form in (r.tolist(), torch.from_numpy(r)):
        np.testing.assert_array_equal(quant.quantize(x, "int8", ranges=form), c)
        np.testing.assert_array_equal(quant.dequantize(c, form), quant.dequantize(c, r))
        for a, b in zip(quant.int8_topk(x, c, form, 3), quant.int8_topk(x, c, r, 3), strict=True):
            np.testing.assert_array_equal(a, b)
    calls = [
        lambda bad: quant.quantize(x, "int8", ranges=bad),
        lambda bad: quant.dequantize(c, bad),
        lambda bad: quant.int8_topk(x, c, bad, 1),
        lambda bad: quant.Index(8, "int8", ranges=bad),
    ]
    for bad, msg in ((np.where(r == r[1, 2], np.nan, r), "ranges must be finite"),
                     (np.where(r == r[0, 5], -np.inf, r), "ranges must be finite"),
                     (r[::-1], r"min > max in 8 dimension\(s\), the first is 0")):
        for call in (calls[0], calls[3]):  # quantize and the Index, which quantizes with them
            with pytest.raises(ValueError, match=msg):
                call(bad)
    flat = r.copy()
    flat[1, 4] = flat[0, 4]  # min == max: a zero step counts as 1, as in sentence-transformers
    want = st_quantize(x, "int8", ranges=flat)
    np.testing.assert_array_equal(quant.quantize(x, "int8", ranges=flat), want)
    for call in calls:
        with pytest.raises(ValueError, match=r"ranges must have shape \(2, 8\) = \[min, max\] per dimension"):
            call(r[:, :5].tolist())
        with pytest.raises(TypeError, match="ranges must be floating point or integer"):
            call(np.ones((2, 8), bool))
    # integer ranges are read as numbers, as sentence-transformers casts them to float32
    ri = np.vstack([np.full(8, -2, np.int64), np.full(8, 3, np.int64)])
    ci = quant.quantize(x, "int8", ranges=ri)
    np.testing.assert_array_equal(ci, st_quantize(x, "int8", ranges=ri))
    for form in (ri.astype(np.int32), torch.from_numpy(ri), ri.tolist()):
        np.testing.assert_array_equal(quant.quantize(x, "int8", ranges=form), ci)
        np.testing.assert_array_equal(quant.dequantize(ci, form), quant.dequantize(ci, ri.astype(np.float64)))
    np.testing.assert_array_equal(quant.Index(8, "int8", ranges=ri).add(x).search(x, 2)[1],
                                  quant.Index(8, "int8", ranges=ri.astype(np.float32)).add(x).search(x, 2)[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_calibration_on_nonfinite_data_names_it(bad):
    """int8 ranges calibrated on data holding NaN or inf are refused, naming the data (not "the ranges")."""
    x = _data(6, 8, np.float32, 2)
    y = x.copy()
    y[3, 2] = bad
    for p in ("int8", "uint8"):
        with pytest.raises(ValueError, match=r"^embeddings hold NaN or inf in 1 dimension\(s\)"):
            quant.quantize(y, p)
        with pytest.raises(ValueError, match=r"^calibration_embeddings hold NaN or inf in 1 dimension\(s\)"):
            quant.quantize(x, p, calibration_embeddings=y)
    np.testing.assert_array_equal(quant.quantize(y, "int8", calibration_embeddings=x),  # data itself: fine
                                  quant.quantize(y, "int8", ranges=quant.calibrate(x)))


def test_float32_output_is_a_copy(tmp_path):
    """quantize(x, "float32") copies, as numpy's astype: a view of a read-only memmap handed back writable
    crashed the process when written; and it never aliases the caller's array or tensor."""
    x = _data(20, 16, np.float32, 3)
    np.save(tmp_path / "x.npy", x)
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = quant.quantize(ro, "float32")
    assert not np.shares_memory(out, ro)
    out[:] = 1.0  # no crash, and the file's data is untouched
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)
    t = torch.from_numpy(x.copy()).requires_grad_(True)
    got = quant.quantize(t, "float32")
    assert got.data_ptr() != t.data_ptr() and not got.requires_grad
    assert not quant.calibrate(t).requires_grad


def test_calibrate_gives_float32_ranges_that_reproduce_the_implicit_ones():
    """calibrate(x) then quantize(x, ranges=...) gives quantize(x)'s codes and sentence-transformers', for
    float16 and float64 too: the steps come from float32 ranges whatever their dtype. The old rule (steps
    in the ranges' dtype) changes codes here, so this test fails under it."""
    for dtype in (np.float16, np.float64):
        for seed in range(3):
            x = _data(300, 128, dtype, seed)
            r = quant.calibrate(x)
            assert r.dtype == (np.float64 if dtype == np.float64 else np.float32)
            for p in ("int8", "uint8"):
                want = st_quantize(x, p)
                np.testing.assert_array_equal(quant.quantize(x, p), want)
                np.testing.assert_array_equal(quant.quantize(x, p, ranges=r), want)
                for rd in (np.float16, np.float64):  # the ranges' dtype no longer changes the codes
                    rr = r.astype(rd)
                    if np.array_equal(rr.astype(np.float32), r.astype(np.float32)):
                        np.testing.assert_array_equal(quant.quantize(x, p, ranges=rr), want)
            if dtype == np.float16:  # pre-6.2 arithmetic (float16 steps of float16 ranges) differs here
                r16 = r.astype(np.float16)
                step = (r16[1] - r16[0]) / np.float16(255)
                old = np.clip(np.floor((x - r16[0]) / np.where(step == 0, np.float16(1), step)), 0, 255)
                assert (old != quant.quantize(x, "uint8")).any()
    assert quant.calibrate(torch.from_numpy(x).bfloat16()).dtype == torch.float32  # numpy has no bfloat16


def test_scalar_quantization_refuses_what_would_give_constant_codes():
    """One row calibrating its own ranges (max == min everywhere), ranges beyond float32's range, and
    ranges whose max - min overflows float32 are ValueErrors, not codes that are all the same."""
    x = _data(5, 16, np.float32, 0)
    for p in ("int8", "uint8"):
        with pytest.raises(ValueError, match="single row"):
            quant.quantize(x[:1], p)
        r = quant.calibrate(x)
        np.testing.assert_array_equal(quant.quantize(x[:1], p, ranges=r), quant.quantize(x, p)[:1])
        got = quant.quantize(x[:1], p, calibration_embeddings=x)
        np.testing.assert_array_equal(got, quant.quantize(x, p)[:1])
        wide = r.copy()
        wide[:, 2] = (-3e38, 3e38)
        with pytest.raises(ValueError, match="too wide: max - min overflows float32"):
            quant.quantize(x, p, ranges=wide)
        huge = r.astype(np.float64)
        huge[1, 4] = 1e39
        with pytest.raises(ValueError, match="beyond float32's range"):
            quant.quantize(x, p, ranges=huge)
        with pytest.raises(ValueError, match="beyond float32's range"):
            quant.Index(16, "int8", ranges=huge)
    np.testing.assert_array_equal(quant.quantize(x[:1], "ubinary"), st_quantize(x[:1], "ubinary"))


@pytest.mark.parametrize("d", [3, 19])  # the scalar tail only, and AVX2 lanes + tail
def test_nan_codes_match_sentence_transformers(d, simd):
    """NaN inputs: sentence-transformers' casts give 0 for uint8 and int8 alike (not code 0 - 128)."""
    x = _data(4, d, np.float32, 1)
    x[0, :] = np.nan
    x[2, d - 1] = np.nan
    r = np.vstack([np.full(d, -2, np.float32), np.full(d, 2, np.float32)])
    for p in ("int8", "uint8"):
        with np.errstate(invalid="ignore"):
            want = st_quantize(x, p, ranges=r)
        assert (want[0] == 0).all()
        np.testing.assert_array_equal(quant.quantize(x, p, ranges=r), want)
        for ct in (np.float64, np.float16):  # the float64 and float16 arithmetic paths
            with np.errstate(invalid="ignore"):
                want = st_quantize(x.astype(ct), p, ranges=r.astype(ct))
            np.testing.assert_array_equal(quant.quantize(x.astype(ct), p, ranges=r.astype(ct)), want)


def test_nan_codes_torch_fallback():
    from llmembed_fast.quant.codes import _quantize_scalar_torch

    x = torch.tensor([[float("nan"), 0.5, -3.0]])
    st, sp = torch.full((3,), -1.0), torch.full((3,), 2 / 255)
    assert _quantize_scalar_torch(x, st, sp, signed=True).tolist() == [[0, 63, -128]]
    assert _quantize_scalar_torch(x, st, sp, signed=False).tolist() == [[0, 191, 0]]


def test_long_double_input_is_a_clear_type_error():
    x = np.zeros((2, 3), np.longdouble)
    if x.dtype.itemsize == 8:
        pytest.skip("long double is double on this platform")
    with pytest.raises(TypeError, match="embeddings must be float16/32/64"):
        quant.quantize(x, "int8")


def test_torch_bit_packing_sets_a_bit_only_above_zero():
    """The plain-torch packing (devices without the op) follows sentence-transformers: +0.0 and -0.0 are
    bit 0, as in the op."""
    from llmembed_fast.quant.codes import _pack_bits_torch

    x = np.array([[0.0, -0.0, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0]], np.float32)
    want = np.packbits(x > 0, axis=-1)
    np.testing.assert_array_equal(quant.quantize(x, "ubinary"), want)
    np.testing.assert_array_equal(_pack_bits_torch(torch.from_numpy(x)).numpy(), want)


def test_unpack_bits_dim_must_fit_the_code_width():
    """dim must be in [8 * nbytes - 7, 8 * nbytes]: 2-byte codes take 9..16."""
    c = np.zeros((2, 2), np.uint8)
    for bad in (8, 17):
        with pytest.raises(ValueError, match="dim"):
            quant.unpack_bits(c, bad)
    assert quant.unpack_bits(c, 9).shape == (2, 9) and quant.unpack_bits(c, 16).shape == (2, 16)
