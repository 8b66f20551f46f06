"""quant.Index: search equals the numpy pipeline (exact first stage + float64 rescoring), save/load
round-trips (mmap and not), the loader rejects truncated / bit-flipped / foreign files with a clear error."""

import os
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
from llmembed_fast import quant  # noqa: E402
from llmembed_fast.quant import IndexFileError  # noqa: E402

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
CONFIGS = [("binary", None), ("binary", "int8"), ("binary", "float"), ("int8", None), ("int8", "float")]


def numpy_pipeline(docs, queries, precision, rescore, ranges, k, mult):
    """Reference: brute-force first stage with ties by lower id, rescoring in float64, order (score desc,
    id asc)."""
    n, dim = docs.shape
    step = (ranges[1].astype(np.float64) - ranges[0]) / 255 if ranges is not None else None
    deq = None
    if ranges is not None:
        c8 = quant.quantize(docs, "int8", ranges=ranges).astype(np.int64) + 128
        deq = ranges[0].astype(np.float64) + (c8 + 0.5) * step
    kc = k if rescore is None else min(n, k * mult)
    if precision == "binary":
        qb, db = np.packbits(queries > 0, axis=-1), np.packbits(docs > 0, axis=-1)
        dist = POPCOUNT[qb[:, None, :] ^ db[None, :, :]].sum(-1)
        key = -(dim - 2 * dist).astype(np.float64)
    else:
        key = -(queries.astype(np.float64) @ deq.T)
    ids = np.arange(n)
    cand = np.stack([np.lexsort((ids, row)) for row in key])[:, :kc]
    if rescore is None:
        return -np.take_along_axis(key, cand, 1), cand
    vec = deq if rescore == "int8" else docs.astype(np.float64)
    s = np.einsum("qd,qcd->qc", queries.astype(np.float64), vec[cand])
    order = np.stack([np.lexsort((c, -row)) for row, c in zip(s, cand, strict=True)])[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(cand, order, 1)


def make(n=300, dim=45, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((6, dim)).astype(np.float32)


@pytest.mark.parametrize("precision,rescore", CONFIGS)
def test_search_equals_numpy_pipeline(precision, rescore):
    for seed in range(2):
        docs, queries = make(seed=seed)
        index = quant.Index(45, precision, rescore)
        index.add(docs[:100]).add(docs[100:])  # ranges calibrated on the first add, kept after
        ranges = index.ranges.numpy() if index.ranges is not None else None
        if ranges is not None:
            np.testing.assert_array_equal(ranges, quant.calibrate(docs[:100]))
        for k, mult in ((1, 4), (10, 3), (300, 1)):
            s, ids = index.search(queries, k, rescore_multiplier=mult)
            want_s, want_i = numpy_pipeline(docs, queries, precision, rescore, ranges, k, mult)
            assert s.dtype == np.float32 and ids.dtype == np.int64 and s.shape == (6, k)
            np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-4)
            if precision == "binary" and rescore is None:
                np.testing.assert_array_equal(ids, want_i)
            else:  # ids equal up to float64 summation-order near-ties
                diff = ids != want_i
                assert not diff.any() or np.allclose(s[diff], want_s[diff], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision,rescore", CONFIGS)
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, precision, rescore, mmap):
    docs, queries = make(n=120, dim=30)
    index = quant.Index(30, precision, rescore).add(torch.from_numpy(docs))
    path = tmp_path / "a.lfidx"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.lfidx"]  # the temporary file was renamed
    back = quant.Index.load(path, mmap=mmap)
    assert (back.dim, back.precision, back.rescore, len(back)) == (30, precision, rescore, 120)
    for a, b in zip(index.search(queries, 5), back.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    back.add(docs[:7])  # a loaded index keeps growing, with the saved ranges
    assert len(back) == 127
    if index.ranges is not None:
        assert torch.equal(back.ranges, index.ranges)
    index.save(path)  # overwriting an existing file is atomic too
    assert len(quant.Index.load(path)) == 120


def test_empty_index_round_trip(tmp_path):
    index = quant.Index(16, "binary", "int8")
    index.save(tmp_path / "e")
    back = quant.Index.load(tmp_path / "e")
    assert len(back) == 0 and back.ranges is None
    with pytest.raises(ValueError, match="empty"):
        back.search(np.ones((1, 16), np.float32), 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    docs, _ = make(n=50, dim=20)
    path = tmp_path_factory.mktemp("idx") / "good.lfidx"
    quant.Index(20, "binary", "int8").add(docs).save(path)
    return path.read_bytes()


def _load_bytes(tmp_path, data, **kw):
    p = tmp_path / "fuzz.lfidx"
    p.write_bytes(data)
    return quant.Index.load(p, **kw)


def test_loader_rejects_truncated_files(tmp_path, saved):
    for cut in sorted({0, 1, 7, 8, 19, 20, 64, len(saved) // 2, len(saved) - 17, len(saved) - 1}):
        with pytest.raises(IndexFileError):
            _load_bytes(tmp_path, saved[:cut])


@pytest.mark.parametrize("verify", [True, False])
def test_loader_rejects_bit_flips(tmp_path, saved, verify):
    """With verify every flip anywhere is caught (CRC32); without, flips in the prefix and header still
    are."""
    rng = np.random.default_rng(0)
    header_end = 20 + struct.unpack_from("<I", saved, 12)[0]
    positions = rng.integers(0, len(saved), 80) if verify else rng.integers(0, header_end, 40)
    for pos in positions:
        data = bytearray(saved)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(IndexFileError):
            _load_bytes(tmp_path, bytes(data), verify=verify)


def test_loader_rejects_foreign_and_wrong_version(tmp_path, saved):
    with pytest.raises(IndexFileError, match="magic"):
        _load_bytes(tmp_path, b"PK\x03\x04" + saved[4:])
    np.save(tmp_path / "x.npy", np.zeros((100, 100), np.float32))
    with pytest.raises(IndexFileError):
        quant.Index.load(tmp_path / "x.npy")
    data = bytearray(saved)
    data[8:12] = struct.pack("<I", 99)
    with pytest.raises(IndexFileError, match="version"):
        _load_bytes(tmp_path, bytes(data))
    with pytest.raises(IndexFileError):
        _load_bytes(tmp_path, b"")
    with pytest.raises(FileNotFoundError):
        quant.Index.load(tmp_path / "missing.lfidx")


def test_index_errors():
    docs, queries = make(n=20, dim=12)
    with pytest.raises(ValueError, match="precision"):
        quant.Index(12, "int4")
    with pytest.raises(ValueError, match="rescore"):
        quant.Index(12, "binary", "fp16")
    with pytest.raises(ValueError, match="rescore"):
        quant.Index(12, "int8", "int8")
    with pytest.raises(ValueError, match="dim"):
        quant.Index(0)
    for bad_dim in ("5", 5.0, True):
        with pytest.raises(TypeError, match="dim"):
            quant.Index(bad_dim)
    with pytest.raises(ValueError, match="ranges"):
        quant.Index(12, "int8", ranges=np.zeros((2, 5), np.float32))
    index = quant.Index(12, "binary", "float")
    with pytest.raises(ValueError, match="empty"):
        index.search(queries, 1)
    index.add(docs)
    with pytest.raises(ValueError, match="mismatch"):
        index.add(docs[:, :5])
    with pytest.raises(ValueError, match="mismatch"):
        index.search(queries[:, :5], 1)
    with pytest.raises(TypeError, match="query_embeddings"):
        index.search(queries.astype(np.int32), 1)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(queries, 21)
    with pytest.raises(ValueError, match="rescore_multiplier"):
        index.search(queries, 2, rescore_multiplier=0)
    with pytest.raises(TypeError, match="rescore_multiplier"):
        index.search(queries, 2, rescore_multiplier=2.0)
    bad = docs.copy()
    bad[3, 1] = np.nan
    for precision in ("binary", "int8"):
        with pytest.raises(ValueError, match="embeddings must be finite"):
            quant.Index(12, precision).add(bad)
    with pytest.raises(ValueError, match="query_embeddings must be finite"):
        index.search(bad, 1)
    with pytest.raises(ValueError, match="ranges must be finite"):
        quant.Index(12, "int8", ranges=np.array([[0.0] * 12, [np.inf] * 12], np.float32))


@pytest.mark.parametrize("precision,rescore", [("binary", "float"), ("binary", "int8"), ("int8", "float")])
def test_rescore_duplicates_score_equal_and_tie_by_id(precision, rescore):
    """Identical vectors score bitwise equal wherever they stand among the candidates, and come back by
    ascending id; each vector's score is the same whatever k and rescore_multiplier."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((3, 100)).astype(np.float32)
        which = rng.integers(0, 3, 300)
        queries = rng.standard_normal((4, 100)).astype(np.float32)
        index = quant.Index(100, precision, rescore).add(base[which])
        full_s, full_i = index.search(queries, 300, rescore_multiplier=1)
        for q in range(4):
            for b in range(3):  # one score per distinct vector
                assert len(set(full_s[q][which[full_i[q]] == b].tolist())) == 1
        for k, mult in ((5, 2), (5, 4), (40, 3), (300, 1)):
            s, i = index.search(queries, k, rescore_multiplier=mult)
            for q in range(4):
                assert all(i[q, j] < i[q, j + 1] for j in range(k - 1) if s[q, j] == s[q, j + 1])
                score_of = dict(zip(full_i[q].tolist(), full_s[q].tolist(), strict=True))
                assert s[q].tolist() == [score_of[j] for j in i[q].tolist()]


def test_rescore_int8_scores_equal_int8_topk():
    docs, queries = make(n=200, dim=45)
    index = quant.Index(45, "binary", "int8").add(docs)
    s, i = index.search(queries, 200, rescore_multiplier=1)  # every vector rescored
    ws, wi = quant.int8_topk(queries, index._data("int8"), index.ranges, 200)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(s, ws)


def test_add_copies_the_callers_buffer():
    for make_input in (lambda a: a, torch.from_numpy):
        x = make_input(np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
        index = quant.Index(8, rescore="float").add(x)
        q = np.asarray(x)[:2].copy()
        before = index.search(q, 3)
        x[:] = 0  # the caller reuses its buffer
        for a, b in zip(index.search(q, 3), before, strict=True):
            np.testing.assert_array_equal(a, b)


def test_ranges_accept_lists_and_check_shape():
    docs, queries = make(n=30, dim=12)
    r = quant.calibrate(docs)
    want = quant.Index(12, "int8", ranges=r).add(docs).search(queries, 4)
    for form in (r.tolist(), torch.from_numpy(r), r.astype(np.float16)):
        got = quant.Index(12, "int8", ranges=form).add(docs).search(queries, 4)
        if not isinstance(form, np.ndarray) or form.dtype != np.float16:
            np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 12\)"):
        quant.Index(12, "int8", ranges=r[:, :5].tolist())
    with pytest.raises(TypeError, match="ranges must be floating point or integer"):
        quant.Index(12, "int8", ranges=np.zeros((2, 12), bool))


def test_load_rejects_nonfinite_ranges(tmp_path):
    from llmembed_fast.quant.io import write_index_file

    docs, _ = make(n=10, dim=8)
    index = quant.Index(8, "binary", "int8").add(docs)
    for bad in (np.nan, np.inf):
        r = index.ranges.numpy().copy()
        r[0, 3] = bad
        meta = {"dim": 8, "count": 10, "precision": "binary", "rescore": "int8"}
        sections = {"bits": index._data("bits").numpy(), "int8": index._data("int8").numpy(), "ranges": r}
        write_index_file(tmp_path / "bad.lfidx", meta, sections)  # CRC-consistent
        with pytest.raises(IndexFileError, match="ranges must be finite"):
            quant.Index.load(tmp_path / "bad.lfidx")


def test_load_rejects_nonfinite_float_vectors(tmp_path):
    """A CRC-consistent file whose stored float vectors hold NaN/inf (add() refuses such) is an error when
    verified, not NaN scores at search time."""
    from llmembed_fast.quant.io import write_index_file

    docs, _ = make(n=10, dim=8)
    index = quant.Index(8, "binary", "float").add(docs)
    for bad in (np.nan, -np.inf):
        v = index._data("float").numpy().copy()
        v[4, 2] = bad
        meta = {"dim": 8, "count": 10, "precision": "binary", "rescore": "float"}
        write_index_file(tmp_path / "bad.lfidx", meta, {"bits": index._data("bits").numpy(), "float": v})
        with pytest.raises(IndexFileError, match="NaN or inf"):
            quant.Index.load(tmp_path / "bad.lfidx")
        assert len(quant.Index.load(tmp_path / "bad.lfidx", verify=False)) == 10  # the fast path trusts it


def test_load_rejects_a_header_the_constructor_refuses(tmp_path):
    """A CRC-consistent header for an int8 index wider than the scan allows is a bad file (IndexFileError,
    which the CLI reports), not the constructor's ValueError."""
    from llmembed_fast.quant.io import write_index_file

    meta = {"dim": 70_000, "count": 0, "precision": "int8", "rescore": None}
    write_index_file(tmp_path / "wide.lfidx", meta, {"int8": np.zeros((0, 70_000), np.int8),
                                                     "ranges": np.zeros((2, 70_000), np.float32)})
    with pytest.raises(IndexFileError, match="65536"):
        quant.Index.load(tmp_path / "wide.lfidx")


def test_sections_are_little_endian_whatever_the_arrays_byte_order(tmp_path):
    from llmembed_fast.quant.io import read_index_file, write_index_file

    r = np.array([[-1.0, 0.0], [1.0, 2.0]])
    write_index_file(tmp_path / "be.lfidx", {"x": 1}, {"ranges": r.astype(">f4"), "v": r.astype(">f8")})
    write_index_file(tmp_path / "le.lfidx", {"x": 1}, {"ranges": r.astype("<f4"), "v": r.astype("<f8")})
    assert (tmp_path / "be.lfidx").read_bytes() == (tmp_path / "le.lfidx").read_bytes()
    for mmap in (False, True):
        _, arrays = read_index_file(tmp_path / "be.lfidx", mmap=mmap)
        np.testing.assert_array_equal(arrays["ranges"], r)
        np.testing.assert_array_equal(arrays["v"], r)


def test_load_rejects_deeply_nested_header(tmp_path):
    import zlib

    from llmembed_fast.quant.io import _FOOTER, _PREFIX, FOOTER_MAGIC, FORMAT, MAGIC

    h = (f'{{"format": "{FORMAT}", "sections": [], "z": ' + "[" * 100000 + "]" * 100000 + "}").encode()
    body = _PREFIX.pack(MAGIC, 1, len(h), zlib.crc32(h)) + h
    body += b"\0" * ((-len(body)) % 64)
    with pytest.raises(IndexFileError, match="unreadable header"):
        _load_bytes(tmp_path, body + _FOOTER.pack(FOOTER_MAGIC, zlib.crc32(body), 0))


def test_saved_file_mode_follows_umask(tmp_path):
    import os
    import stat

    index = quant.Index(8).add(np.ones((2, 8), np.float32))
    old = os.umask(0o022)
    try:
        for mask, want in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            index.save(tmp_path / f"m{mask:o}.lfidx")
            assert stat.S_IMODE(os.stat(tmp_path / f"m{mask:o}.lfidx").st_mode) == want
    finally:
        os.umask(old)


def test_resaving_keeps_an_existing_files_mode(tmp_path):
    import os
    import stat

    index = quant.Index(8).add(np.ones((2, 8), np.float32))
    path = tmp_path / "private.lfidx"
    old = os.umask(0o022)
    try:
        index.save(path)
        os.chmod(path, 0o600)  # made private by its owner: saving again must not widen it to 0644
        index.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.chmod(path, 0o640)
        index.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


def _with_header(tmp_path, saved_bytes: bytes, header: bytes):
    """``saved_bytes`` with its header replaced by ``header`` (checksums recomputed, payload appended)."""
    return _with_header_kw(tmp_path, saved_bytes, header)


def _with_header_kw(tmp_path, saved_bytes: bytes, header: bytes, **load_kw):
    import zlib

    from llmembed_fast.quant.io import _FOOTER, _PREFIX, FOOTER_MAGIC

    magic, version, hlen, _ = _PREFIX.unpack_from(saved_bytes, 0)
    start = _PREFIX.size + hlen + (-(_PREFIX.size + hlen)) % 64
    body = _PREFIX.pack(magic, version, len(header), zlib.crc32(header)) + header
    body += b"\0" * ((-len(body)) % 64) + saved_bytes[start : len(saved_bytes) - _FOOTER.size]
    return _load_bytes(tmp_path, body + _FOOTER.pack(FOOTER_MAGIC, zlib.crc32(body), 0), **load_kw)


def test_loader_rejects_checksum_consistent_malformed_headers(tmp_path, saved):
    """A header with valid checksums but an unhashable dtype, a zero-byte section of a shape numpy cannot
    hold, or an integer too long for int(): IndexFileError, never another exception."""
    import json

    from llmembed_fast.quant.io import _PREFIX

    data = saved
    hlen = _PREFIX.unpack_from(data, 0)[2]
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    cases = []
    h = json.loads(json.dumps(header))
    h["sections"][0]["dtype"] = []
    cases.append(json.dumps(h).encode())
    h = json.loads(json.dumps(header))
    h["sections"][0].update(nbytes=0, shape=[0, 10**30])
    cases.append(json.dumps(h).encode())
    cases.append(json.dumps(header).replace(f'"count": {header["count"]}', '"count": ' + "9" * 5000).encode())
    for raw in cases:
        with pytest.raises(IndexFileError):
            _with_header(tmp_path, data, raw)


@pytest.mark.parametrize("mmap", [True, False])
def test_loader_rejects_a_section_shape_numpy_cannot_hold(tmp_path, saved, mmap):
    """A section of 70 dimensions whose sizes, offsets and checksums are all consistent: numpy refuses the
    array itself (a ValueError escaped the loader, and `llmembed-fast search` printed a traceback)."""
    import json

    from llmembed_fast.quant.io import _PREFIX

    hlen = _PREFIX.unpack_from(saved, 0)[2]
    header = json.loads(saved[_PREFIX.size : _PREFIX.size + hlen])
    start = lambda n: _PREFIX.size + n + (-(_PREFIX.size + n)) % 64  # noqa: E731  (payload's first byte)
    h = json.loads(json.dumps(header))
    h["sections"][0]["shape"] = [1] * 69 + [h["sections"][0]["nbytes"]]
    for _ in range(3):  # the payload moves with the header's length: so do the offsets written in it
        shift = start(len(json.dumps(h).encode())) - start(hlen)
        for s_new, s_old in zip(h["sections"], header["sections"], strict=True):
            s_new["offset"] = s_old["offset"] + shift
    raw = json.dumps(h).encode()
    assert start(len(raw)) - start(hlen) == shift
    with pytest.raises(IndexFileError, match="bad shape"):
        _with_header_kw(tmp_path, saved, raw, mmap=mmap)


def test_save_paths_long_names_symlinks_missing_folders(tmp_path):
    import os

    index = quant.Index(8).add(np.ones((3, 8), np.float32))
    long = tmp_path / ("n" * 240 + ".lfidx")  # 246 characters: the temporary file's name must not be longer
    index.save(long)
    assert len(quant.Index.load(long)) == 3
    real, link = tmp_path / "real.lfidx", tmp_path / "link.lfidx"
    index.save(real)
    os.symlink(real, link)
    quant.Index(8).add(np.ones((5, 8), np.float32)).save(link)  # writes the file the link names
    assert os.path.islink(link) and len(quant.Index.load(real)) == 5
    with pytest.raises(FileNotFoundError, match="folder does not exist") as err:
        index.save(tmp_path / "missing" / "x.lfidx")
    assert err.value.filename.endswith("x.lfidx")


def test_values_beyond_float32_and_int8_width_are_refused():
    x = np.ones((2, 16))
    x[1, 3] = 1e200  # finite in float64; the index stores float32
    for precision, rescore in (("binary", "float"), ("int8", None), ("binary", "int8")):
        with pytest.raises(ValueError, match="embeddings hold values beyond float32's range"):
            quant.Index(16, precision, rescore).add(x)
    with pytest.raises(ValueError, match="dim: int8 codes support at most 65536"):
        quant.Index(65537, "int8")
    with pytest.raises(ValueError, match="dim: int8 codes support at most 65536"):
        quant.Index(65537, "binary", "int8")
    quant.Index(65537, "binary", "float")  # binary codes have no such limit


def test_add_while_searching_keeps_every_row():
    """search merges the stored parts lazily; an add() running meanwhile must not lose its rows."""
    import threading

    rng = np.random.default_rng(7)
    docs = rng.standard_normal((3000, 64)).astype(np.float32)
    index = quant.Index(64, "binary", "int8").add(docs[:100])
    errors = []

    def adder():
        for j in range(100, 3000, 10):
            index.add(docs[j : j + 10])

    def searcher():
        for _ in range(300):
            try:
                index.search(docs[:1], 5)
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                errors.append(repr(exc))

    threads = [threading.Thread(target=f) for f in (adder, searcher, searcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(index) == index._data("bits").shape[0] == index._data("int8").shape[0] == 3000
    scores, ids = index.search(docs[2990:2991], 1)
    assert ids[0, 0] == 2990


def test_copy_does_not_share_storage(tmp_path):
    """copy.copy(index): adding to the copy leaves the original as it was (it shared the parts' lists, so
    the original's storage grew past its count and its saved file would not load)."""
    import copy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    a = quant.Index(16, "binary", "float").add(x)
    b = copy.copy(a)
    b.add(rng.standard_normal((50, 16)).astype(np.float32))
    assert len(a) == 50 and len(b) == 100
    s, ids = a.search(x[:3], 5)
    assert int(ids.max()) < 50
    a.save(tmp_path / "a.lfidx")
    assert len(quant.Index.load(tmp_path / "a.lfidx")) == 50


def test_save_while_adding_writes_a_consistent_file(tmp_path):
    """save() takes one snapshot under the lock: an add() from another thread lands wholly in the file or
    not at all (sections and count were read separately, and such a file did not load). Deterministic: an
    add is started from inside save, right after its first section is read, and given time to finish."""
    import threading

    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 64)).astype(np.float32)
    index = quant.Index(64, "binary", "float").add(x[:500])
    merged, adders = index._merged, []

    def hooked(name):
        out = merged(name)
        if not adders:
            adders.append(threading.Thread(target=index.add, args=(x[500:],)))
            adders[0].start()
            adders[0].join(timeout=1.0)  # blocks on the lock while save holds it
        return out

    index._merged = hooked
    index.save(tmp_path / "race.lfidx")
    adders[0].join()
    del index._merged
    loaded = quant.Index.load(tmp_path / "race.lfidx")
    assert len(loaded) == 500 and len(index) == 600
    assert loaded.search(x[:2], 1)[1][:, 0].tolist() == [0, 1]


def test_rescore_int8_ranks_before_the_bias():
    """Index(binary, rescore="int8") ranks as int8_topk: on the exact score before the per-query bias is
    added (adding it first rounded distinct scores equal, then ordered by id: [0 1 2 3 4] here)."""
    n = 50
    r = np.array([[1e6, 0.0], [1e6 + 255, 255.0]], dtype=np.float32)  # a large offset in dim 0
    x = np.stack([np.full(n, 1e6 + 10.2), np.arange(n) + 0.5], 1).astype(np.float32)
    q = np.array([[1.0, 1e-12]], np.float32)  # doc j's dim-1 code is j: higher id, higher score
    _, want = quant.int8_topk(q, quant.quantize(x, "int8", ranges=r), r, 5)
    assert want[0].tolist() == [49, 48, 47, 46, 45]
    _, got = quant.Index(2, "binary", "int8", ranges=r).add(x).search(q, 5, rescore_multiplier=100)
    assert got[0].tolist() == want[0].tolist()


def test_load_rejects_ranges_the_constructor_refuses(tmp_path):
    from llmembed_fast.quant.io import write_index_file

    docs, _ = make(n=10, dim=8)
    index = quant.Index(8, "binary", "int8").add(docs)
    r = index.ranges.numpy().copy()
    r[:, 2] = (-3e38, 3e38)  # finite, but max - min overflows float32
    meta = {"dim": 8, "count": 10, "precision": "binary", "rescore": "int8"}
    sections = {"bits": index._data("bits").numpy(), "int8": index._data("int8").numpy(), "ranges": r}
    write_index_file(tmp_path / "wide.lfidx", meta, sections)
    with pytest.raises(IndexFileError, match="too wide"):
        quant.Index.load(tmp_path / "wide.lfidx")


def test_zero_width_dimensions_rank_with_quantizes_step():
    """Ranges with max == min (calibrated on one row): quantize counts units of 1 above min there (as
    sentence-transformers does), so dequantize, int8_topk and int8 rescoring must read the codes with that
    step too; with step 0 every document scored the same and ids came back in storage order."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 6)).astype(np.float32) * 20
    q = rng.standard_normal((4, 6)).astype(np.float32)
    r = np.stack([x[0], x[0]])
    codes = quant.quantize(x, "int8", ranges=r)
    deq = quant.dequantize(codes, r)
    u = codes.astype(np.int64) + 128
    np.testing.assert_allclose(deq, r[0] + u + 0.5, rtol=1e-6)
    scores, ids = quant.int8_topk(q, codes, r, 5)
    want = np.argsort(-(q.astype(np.float64) @ deq.astype(np.float64).T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, want)
    assert len(set(ids[:, 0].tolist())) > 1
    with pytest.warns(UserWarning, match="max == min") as rec:
        index = quant.Index(6, "int8").add(x[:1])
    assert rec[0].filename == __file__  # attributed to the caller's line
    index.add(x[1:])
    _, got = index.search(q, 5)
    np.testing.assert_array_equal(got, ids)


def test_ranges_too_wide_for_float32_are_refused():
    big = np.array([[-3e38, 1.0], [3e38, -1.0]], np.float32)
    with pytest.raises(ValueError, match="too wide"):
        quant.Index(2, "int8").add(big)
    with pytest.raises(ValueError, match="too wide"):
        quant.Index(2, "int8", ranges=np.array([[-3e38, 0], [3e38, 1]], np.float32))


def test_save_path_errors_name_the_path(tmp_path):
    """A folder or an empty path is refused up front, naming it (the error named a temporary file after the
    whole payload was written); a bytes path works like a str one."""
    index = quant.Index(13).add(np.random.default_rng(0).standard_normal((5, 13)).astype(np.float32))
    for bad in ("", str(tmp_path)):
        with pytest.raises(IsADirectoryError, match="is a folder"):
            index.save(bad)
    assert not list(tmp_path.iterdir())  # nothing left behind
    index.save(os.fsencode(tmp_path / "x.lfidx"))
    assert len(quant.Index.load(tmp_path / "x.lfidx")) == 5


@pytest.mark.parametrize("rescore", ["float", "int8"])
def test_rescored_ties_come_back_by_id(rescore):
    """Two different vectors with exactly equal rescored scores come back by id, even when the first stage
    (Hamming) ranked the higher id first."""
    docs = np.array([[0.5, 1.0], [0.5, -1.0]], np.float32)  # bits 11 / 10; the query's bits 10
    ranges = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    index = quant.Index(2, "binary", rescore, ranges=ranges).add(docs)
    s, ids = index.search(np.array([[1.0, 0.0]], np.float32), 2)
    assert s[0, 0] == s[0, 1]
    assert ids.tolist() == [[0, 1]]


def test_empty_index_with_a_partial_byte_round_trips(tmp_path):
    """An empty binary index with dim % 8 != 0 saves [0, ceil(dim / 8)] bits and loads back."""
    p = tmp_path / "e.lfidx"
    quant.Index(12, "binary").save(p)
    back = quant.Index.load(p)
    assert len(back) == 0 and back._data("bits").shape == (0, 2)


def _rewrite_header(p, edit):
    """The index file at ``p`` with its JSON header passed through ``edit`` (same length), checksums fixed:
    only the loader's own bounds checks can refuse it."""
    import zlib

    from llmembed_fast.quant.io import _FOOTER, _PREFIX, FOOTER_MAGIC

    data = p.read_bytes()
    hlen = _PREFIX.unpack_from(data, 0)[2]
    header = data[_PREFIX.size : _PREFIX.size + hlen]
    new = edit(header)
    assert new != header and len(new) == len(header)
    body = _PREFIX.pack(*_PREFIX.unpack_from(data, 0)[:3], zlib.crc32(new)) + new
    body += data[len(body) : len(data) - _FOOTER.size]
    p.write_bytes(body + _FOOTER.pack(FOOTER_MAGIC, zlib.crc32(body), 0))


@pytest.mark.parametrize("mmap", [True, False])
def test_sections_outside_the_payload_or_overlapping_are_refused(tmp_path, mmap):
    """A section running past the payload into the footer, and two sections at one offset, are refused
    though every checksum holds."""
    from llmembed_fast.quant.io import read_index_file, write_index_file

    p = tmp_path / "s.lfidx"
    write_index_file(p, {"x": 1}, {"a": np.arange(64, dtype=np.uint8)})
    _rewrite_header(p, lambda h: h.replace(b'"nbytes": 64', b'"nbytes": 72').replace(b'"shape": [64]',
                                                                                     b'"shape": [72]'))
    with pytest.raises(IndexFileError, match="outside the payload"):
        read_index_file(p, mmap=mmap)
    write_index_file(p, {"x": 1}, {"a": np.arange(64, dtype=np.uint8), "b": np.arange(64, dtype=np.uint8)})
    meta, _ = read_index_file(p)
    off_a, off_b = (s["offset"] for s in meta["sections"])
    assert len(str(off_a)) == len(str(off_b))
    _rewrite_header(p, lambda h: h.replace(f'"offset": {off_b}'.encode(), f'"offset": {off_a}'.encode()))
    with pytest.raises(IndexFileError, match="overlap"):
        read_index_file(p, mmap=mmap)


def test_header_length_past_the_file_is_named(tmp_path):
    """A header length larger than the file is reported as such (not as a checksum mismatch)."""
    from llmembed_fast.quant.io import _PREFIX

    p = tmp_path / "h.lfidx"
    quant.Index(8).add(np.ones((2, 8), np.float32)).save(p)
    data = bytearray(p.read_bytes())
    magic, version, _, hcrc = _PREFIX.unpack_from(data, 0)
    _PREFIX.pack_into(data, 0, magic, version, len(data), hcrc)
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="does not fit"):
        quant.Index.load(p)
