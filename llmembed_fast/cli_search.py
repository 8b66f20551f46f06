"""``llmembed-fast search``: build a quantized index from a .npy of embeddings (or load a saved one) and
query it with a .npy of query embeddings."""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import time

from llmembed_fast.cli import CliError as _Error
from llmembed_fast.cli import int_at_least, positive_int, stdin_bytes, unwritable, write_atomic


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="build/load a quantized index and search it",
        description="Build an index from CORPUS.npy (float [N, D]) or load a saved index file, then search "
        "it with QUERIES.npy (float [Q, D]; - reads it from standard input). Results go to stdout, or to "
        "--output (.npz or .json).",
    )
    p.add_argument(
        "corpus", help="corpus embeddings (.npy, float [N, D]) or an index file written by --save-index"
    )
    p.add_argument(
        "queries",
        nargs="?",
        help="query embeddings (.npy, float [Q, D]; - reads the .npy bytes from standard input); omit to "
        "only build/save",
    )
    p.add_argument("-k", type=positive_int, default=10, help="results per query (default 10)")
    p.add_argument(
        "--precision",
        choices=["binary", "int8"],
        default=None,
        help="first-stage codes (default binary; not with an index file)",
    )
    p.add_argument(
        "--rescore",
        choices=["none", "int8", "float"],
        default=None,
        help="rescore the first-stage candidates with the float query (default: int8 for --precision binary, "
        "none for int8)",
    )
    p.add_argument(
        "--rescore-multiplier", type=positive_int, default=4, help="candidates kept per result (default 4)"
    )
    p.add_argument("--calibration", metavar="CAL.npy", help="embeddings to calibrate the int8 ranges on")
    p.add_argument("--save-index", metavar="PATH", help="write the built index to PATH")
    p.add_argument("--output", metavar="PATH", help="write scores and ids to PATH (.npz or .json)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    p.add_argument(
        "--show",
        type=int_at_least(0),
        default=3,
        help="queries to print when there is no --output (default 3)",
    )
    p.set_defaults(func=run)


def _load_npy(path: str, what: str, stdin_ok: bool = False):
    """A 2-D float array from the .npy file ``path`` (memory-mapped); with ``stdin_ok``, ``-`` reads the .npy
    bytes from standard input (e.g. ``python make_queries.py | llmembed-fast search docs.lfidx -``)."""
    import numpy as np

    data = None
    name = repr(path)
    if path == "-" and stdin_ok:  # read whole: a pipe cannot be memory-mapped
        try:
            data = stdin_bytes(what)
        except OSError as exc:
            raise _Error(str(exc)) from None
        name = "- (standard input)"
    elif os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        try:  # a pipe (/dev/stdin, <(zcat q.npy)): read whole too
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise _Error(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    try:
        if data is not None:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # an empty file: EOFError
        if data is not None:
            head = data[:6]
        else:
            try:
                with open(path, "rb") as f:
                    head = f.read(6)
            except OSError:
                head = b"\x93NUMPY"
        if head and not head.startswith((b"\x93NUMPY", b"PK")):  # numpy's pickle advice would mislead
            raise _Error(f"{what} {name} is not a .npy file (its first bytes are {head!r})") from None
        raise _Error(f"cannot read {what} {name}: {exc}") from None
    if not isinstance(a, np.ndarray):  # np.load gives an NpzFile for a .npz archive
        close = getattr(a, "close", None)
        if callable(close):
            close()
        raise _Error(f"{what} {name} must be a .npy file (one array), got a {type(a).__name__}")
    if a.ndim != 2 or a.dtype.kind != "f":
        raise _Error(f"{what} {name} must be a 2-D float array, got {a.dtype} {a.shape}")
    return a


def _is_index_file(path: str) -> bool:
    """An index file by its magic bytes (whatever its name); otherwise by name, unless it is a .npy file."""
    from llmembed_fast.quant.io import MAGIC

    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise _Error(f"cannot read corpus {path!r}: {exc.strerror or exc}") from None
    if head == MAGIC:
        return True
    # a .npz archive (zip magic) goes to the .npy loader too, whose error says to give one array
    return not (head.startswith((b"\x93NUMPY", b"PK")) or path.endswith((".npy", ".npz")))


def run(args) -> int:
    try:
        return _run(args)
    except _Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _output_path(path: str) -> str:
    """The file --output writes: .json as given, anything else as .npz (numpy adds the suffix); a path
    ending in a separator as given (a folder: refused by the check, not written as its hidden ".npz")."""
    return path if path.endswith((".json", ".npz", "/", os.sep)) else path + ".npz"


def _run(args) -> int:
    import numpy as np
    import torch

    from llmembed_fast import quant  # without the C++ extension: its plain-torch paths, with a warning

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.corpus == "-":  # an index file is memory-mapped, a .npy corpus too: a file is needed
        raise _Error(
            "corpus -: standard input is for QUERIES only; give the corpus (.npy or index) as a file"
        )
    if os.path.exists(args.corpus) and not os.path.isfile(args.corpus) and not os.path.isdir(args.corpus):
        raise _Error(f"corpus {args.corpus!r} is not a file (a pipe cannot be memory-mapped): give a file")
    is_index = _is_index_file(args.corpus)
    if is_index:
        given = [
            o
            for o, v in (
                ("--precision", args.precision),
                ("--rescore", args.rescore),
                ("--calibration", args.calibration),
            )
            if v is not None
        ]
        if given:
            raise _Error(
                f"{', '.join(given)}: the index file {args.corpus!r} fixes these (they apply when "
                "building from a .npy)"
            )
    if args.output and not args.queries:
        raise _Error("--output needs QUERIES (there is nothing to write without a search)")
    # the output paths before any work (building an index can take minutes)
    out_path = _output_path(args.output) if args.output else None
    for flag, target in (("--save-index", args.save_index), ("--output", out_path)):
        why = unwritable(target, flag) if target else None
        if why:
            raise _Error(f"cannot write {why}")
    queries = None  # read and checked before the index is built, so that a bad file fails fast
    if args.queries:
        queries = np.ascontiguousarray(_load_npy(args.queries, "queries", stdin_ok=True))
    precision = args.precision or "binary"
    rescore = args.rescore or ("int8" if precision == "binary" else "none")
    rescore = None if rescore == "none" else rescore
    t0 = time.perf_counter()
    if not is_index:
        corpus = _load_npy(args.corpus, "corpus")
        if queries is not None and args.k > corpus.shape[0]:  # before building the index
            raise _Error(f"k must be in [1, {corpus.shape[0]}] (the corpus size), got {args.k}")
        if queries is not None and queries.shape[1] != corpus.shape[1]:
            where = "- (standard input)" if args.queries == "-" else repr(args.queries)
            raise _Error(
                f"queries {where} have {queries.shape[1]} dimensions, the corpus {corpus.shape[1]}: "
                "dimension mismatch"
            )
        ranges = None
        if args.calibration:
            try:
                ranges = quant.calibrate(_load_npy(args.calibration, "calibration"))
            except (ValueError, TypeError) as exc:
                raise _Error(f"calibration {args.calibration!r}: {exc}") from None
        try:
            index = quant.Index(corpus.shape[1], precision, rescore, ranges=ranges)
        except (ValueError, TypeError) as exc:
            raise _Error(str(exc)) from None
        try:
            index.add(corpus)
        except (ValueError, TypeError) as exc:
            raise _Error(f"corpus {args.corpus!r}: {exc}") from None
        action = "built"
    else:
        try:
            index = quant.Index.load(args.corpus)
        except (quant.IndexFileError, OSError) as exc:
            raise _Error(str(exc)) from None
        action = "loaded"
    print(f"{action} {index!r} ({index.nbytes() / 2**20:.1f} MiB) in {time.perf_counter() - t0:.2f} s")
    if args.save_index:
        try:
            index.save(args.save_index)
        except OSError as exc:
            raise _Error(f"cannot write --save-index {args.save_index!r}: {exc.strerror or exc}") from None
        print(f"saved {args.save_index}")
    if queries is None:
        return 0
    t0 = time.perf_counter()
    try:
        scores, ids = index.search(queries, args.k, rescore_multiplier=args.rescore_multiplier)
    except (ValueError, TypeError) as exc:
        raise _Error(str(exc)) from None
    dt = time.perf_counter() - t0
    print(
        f"searched {len(queries)} queries, k={args.k}, in {dt:.3f} s "
        f"({len(queries) / max(dt, 1e-9):.0f} queries/s)"
    )
    if args.output:
        out = _output_path(args.output)
        if out.endswith(".json"):
            data = json.dumps({"scores": scores.tolist(), "ids": ids.tolist()}).encode()
        else:
            data = functools.partial(np.savez, scores=scores, ids=ids)
        try:
            write_atomic(out, data)
        except OSError as exc:
            raise _Error(f"cannot write --output {out!r}: {exc.strerror or exc}") from None
        print(f"wrote {out}")
    else:
        for i in range(min(args.show, len(queries))):
            pairs = ", ".join(f"{j}:{s:.4g}" for j, s in zip(ids[i], scores[i], strict=True))
            print(f"query {i}: {pairs}")
    return 0
