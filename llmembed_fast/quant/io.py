"""The index file: validated on load, written atomically, no pickle.

Layout (little-endian):
    0   8 bytes   magic b"\\x89LFIDX\\r\\n" (a high-bit byte and CRLF catch text-mode and 7-bit mangling)
    8   u32       format version (1)
    12  u32       header length H
    16  u32       CRC32 of the header
    20  H bytes   header: UTF-8 JSON {"format", "dim", "count", "precision", "rescore", "sections": [...]}
    ...           sections (64-byte aligned): raw C-order arrays, each described in the header by
                  {"name", "dtype", "shape", "offset", "nbytes"}
    end 16 bytes  footer: b"LFIDXEND", u32 CRC32 of every byte before the footer, u32 zero
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib

import numpy as np

from llmembed_fast._files import write_atomic

MAGIC = b"\x89LFIDX\r\n"
FOOTER_MAGIC = b"LFIDXEND"
VERSION = 1
FORMAT = "llmembed_fast.quant.Index"
ALIGN = 64
_PREFIX = struct.Struct("<8sIII")
_FOOTER = struct.Struct("<8sII")
ALLOWED_DTYPES = {"uint8", "int8", "float16", "float32", "float64"}
_MAX_HEADER = 1 << 24


class IndexFileError(ValueError):
    """The file is not a valid llmembed_fast index (truncated, corrupted, foreign or from a newer version)."""


def _pad(n: int) -> int:
    return (-n) % ALIGN


def write_index_file(path: str | os.PathLike, meta: dict, sections: dict[str, np.ndarray]) -> None:
    """Write ``meta`` (JSON-able) and named arrays to ``path`` atomically (temporary file, fsync, rename)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path or os.path.isdir(path):  # before any work, and naming the path (not the temporary file)
        raise IsADirectoryError(f"path {path!r} is a folder (or empty): give a file name")
    # the format is little-endian whatever the host or the array says (a ">f4" array is byte-swapped here)
    arrays = {name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for name, a in sections.items()}
    for name, a in arrays.items():
        if a.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"section {name!r}: dtype {a.dtype} cannot be stored")
    # The header holds the section offsets, which depend on the header length: iterate to a fixed point.
    offsets: dict[str, int] = {}
    header = b""
    for _ in range(4):
        desc = [
            {
                "name": n,
                "dtype": a.dtype.name,
                "shape": list(a.shape),
                "offset": offsets.get(n, 0),
                "nbytes": int(a.nbytes),
            }
            for n, a in arrays.items()
        ]
        header = json.dumps({**meta, "format": FORMAT, "sections": desc}, sort_keys=True).encode()
        pos = _PREFIX.size + len(header)
        pos += _pad(pos)
        new = {}
        for n, a in arrays.items():
            new[n] = pos
            pos += a.nbytes + _pad(a.nbytes)
        if new == offsets:
            break
        offsets = new
    directory = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "the index file's folder does not exist", os.fspath(path))

    def fill(f) -> None:
        crc = 0

        def put(b) -> None:
            nonlocal crc
            f.write(b)
            crc = zlib.crc32(b, crc)

        put(_PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header)))
        put(header)
        put(b"\0" * _pad(_PREFIX.size + len(header)))
        for n, a in arrays.items():
            assert f.tell() == offsets[n]
            if a.nbytes:
                put(memoryview(a.reshape(-1)).cast("B"))
            put(b"\0" * _pad(a.nbytes))
        f.write(_FOOTER.pack(FOOTER_MAGIC, crc, 0))

    write_atomic(path, fill, prefix=".lfidx-")


def _fail(path: str, why: str):
    raise IndexFileError(f"{path}: not a valid llmembed_fast index file ({why})")


def read_index_file(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> tuple[dict, dict]:
    """Read and validate an index file -> (meta, {name: numpy array}).

    Every size and offset is checked against the file before use; with ``verify`` the CRC32 of the whole
    file is checked too. ``mmap`` maps the sections copy-on-write (nothing is read until used).
    Raises IndexFileError on any inconsistency, FileNotFoundError when the file does not exist.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < _PREFIX.size + _FOOTER.size:
        _fail(path, f"only {size} bytes: truncated or not an index")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        magic, version, hlen, hcrc = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            _fail(path, "wrong magic bytes")
        if version != VERSION:
            _fail(path, f"format version {version}, this build reads version {VERSION}")
        if hlen > min(_MAX_HEADER, size - _PREFIX.size - _FOOTER.size):
            _fail(path, f"header length {hlen} does not fit the file of {size} bytes: truncated or corrupted")
        header = f.read(hlen)
        if len(header) != hlen or zlib.crc32(header) != hcrc:
            _fail(path, "header checksum mismatch: corrupted")
        f.seek(size - _FOOTER.size)
        fmagic, crc, zero = _FOOTER.unpack(f.read(_FOOTER.size))
        if fmagic != FOOTER_MAGIC or zero != 0:
            _fail(path, "missing footer: truncated or corrupted")
        if verify:
            f.seek(0)
            running, left = 0, size - _FOOTER.size
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    _fail(path, "truncated")
                running = zlib.crc32(block, running)
                left -= len(block)
            if running != crc:
                _fail(path, "payload checksum mismatch: corrupted")
    try:
        meta = json.loads(header.decode("utf-8"))
    # ValueError: JSONDecodeError, and integers too long for int(); RecursionError: deep nesting
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _fail(path, f"unreadable header: {exc}")
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("sections"), list)
    ):
        _fail(path, "header does not describe an llmembed_fast index")
    end = size - _FOOTER.size
    arrays: dict[str, np.ndarray] = {}
    spans = []
    for s in meta["sections"]:
        if not isinstance(s, dict):
            _fail(path, "malformed section entry")
        name, dtype, shape, offset, nbytes = (
            s.get(k) for k in ("name", "dtype", "shape", "offset", "nbytes")
        )
        if not isinstance(name, str) or name in arrays:
            _fail(path, f"bad or repeated section name {name!r}")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            _fail(path, f"section {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 2 or not all(  # every section is a vector or matrix
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
        ):
            _fail(path, f"section {name!r}: bad shape {shape!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (offset, nbytes)):
            _fail(path, f"section {name!r}: bad offset/size")
        dt = np.dtype(dtype).newbyteorder("<")
        if int(np.prod(shape, dtype=object)) * dt.itemsize != nbytes:
            _fail(path, f"section {name!r}: size {nbytes} does not match shape {shape} of {dtype}")
        if offset % ALIGN or offset < _PREFIX.size + hlen or offset + nbytes > end:
            _fail(path, f"section {name!r}: bytes [{offset}, {offset + nbytes}) lie outside the payload")
        spans.append((offset, offset + nbytes, name))
        if nbytes == 0:
            try:
                arrays[name] = np.zeros(shape, dtype=dt)
            except ValueError:  # a zero-size shape numpy cannot hold ([0, 10**30], too many dims)
                _fail(path, f"section {name!r}: bad shape {shape!r}")
        elif mmap:
            try:
                arrays[name] = np.memmap(path, dtype=dt, mode="c", offset=offset, shape=tuple(shape))
            except ValueError as exc:  # numpy's own refusal of a shape: still a bad file, not a crash
                _fail(path, f"section {name!r}: {exc}")
        else:
            with open(path, "rb") as f:
                f.seek(offset)
                buf = f.read(nbytes)
            if len(buf) != nbytes:
                _fail(path, f"section {name!r}: truncated")
            try:
                arrays[name] = np.frombuffer(bytearray(buf), dtype=dt).reshape(shape)
            except ValueError as exc:
                _fail(path, f"section {name!r}: {exc}")
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            _fail(path, f"sections {an!r} and {bn!r} overlap")
    return meta, arrays
