"""``llmembed-fast search``: build a quantized index from a .npy of embeddings (or load a saved one) and
query it with a .npy of query embeddings."""

from __future__ import annotations

import json
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="build/load a quantized index and search it",
        description="Build an index from CORPUS.npy (float [N, D]) or load a saved index file, then search "
        "it "
        "with QUERIES.npy (float [Q, D]). Results go to stdout, or to --output (.npz or .json).",
    )
    p.add_argument(
        "corpus", help="corpus embeddings (.npy, float [N, D]) or an index file written by --save-index"
    )
    p.add_argument(
        "queries", nargs="?", help="query embeddings (.npy, float [Q, D]); omit to only build/save"
    )
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--precision", choices=["binary", "int8"], default="binary", help="first-stage codes")
    p.add_argument(
        "--rescore",
        choices=["none", "int8", "float"],
        default="int8",
        help="rescore the first-stage candidates with the float query (default int8)",
    )
    p.add_argument("--rescore-multiplier", type=int, default=4, help="candidates kept per result (default 4)")
    p.add_argument("--calibration", metavar="CAL.npy", help="embeddings to calibrate the int8 ranges on")
    p.add_argument("--save-index", metavar="PATH", help="write the built index to PATH")
    p.add_argument("--output", metavar="PATH", help="write scores and ids to PATH (.npz or .json)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument(
        "--show", type=int, default=3, help="queries to print when there is no --output (default 3)"
    )
    p.set_defaults(func=run)


def _load_npy(path: str, what: str):
    import numpy as np

    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"llmembed-fast search: cannot read {what} {path!r}: {exc}") from None
    if a.ndim != 2 or a.dtype.kind != "f":
        raise SystemExit(
            f"llmembed-fast search: {what} {path!r} must be a 2-D float array, got {a.dtype} {a.shape}"
        )
    return a


def run(args) -> int:
    import numpy as np
    import torch

    from llmembed_fast import quant

    if args.threads:
        torch.set_num_threads(args.threads)
    rescore = None if args.rescore == "none" else args.rescore
    t0 = time.perf_counter()
    if args.corpus.endswith(".npy"):
        corpus = _load_npy(args.corpus, "corpus")
        ranges = quant.calibrate(_load_npy(args.calibration, "calibration")) if args.calibration else None
        try:
            index = quant.Index(corpus.shape[1], args.precision, rescore, ranges=ranges)
        except ValueError as exc:
            raise SystemExit(f"llmembed-fast search: {exc}") from None
        index.add(corpus)
        action = "built"
    else:
        try:
            index = quant.Index.load(args.corpus)
        except (quant.IndexFileError, OSError) as exc:
            raise SystemExit(f"llmembed-fast search: {exc}") from None
        action = "loaded"
    print(f"{action} {index!r} ({index.nbytes() / 2**20:.1f} MiB) in {time.perf_counter() - t0:.2f} s")
    if args.save_index:
        index.save(args.save_index)
        print(f"saved {args.save_index}")
    if not args.queries:
        return 0
    queries = np.ascontiguousarray(_load_npy(args.queries, "queries"))
    t0 = time.perf_counter()
    try:
        scores, ids = index.search(queries, args.k, rescore_multiplier=args.rescore_multiplier)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"llmembed-fast search: {exc}") from None
    dt = time.perf_counter() - t0
    print(
        f"searched {len(queries)} queries, k={args.k}, in {dt:.3f} s "
        f"({len(queries) / max(dt, 1e-9):.0f} queries/s)"
    )
    if args.output:
        if args.output.endswith(".json"):
            with open(args.output, "w") as f:
                json.dump({"scores": scores.tolist(), "ids": ids.tolist()}, f)
        else:
            np.savez(args.output, scores=scores, ids=ids)
        print(f"wrote {args.output}")
    else:
        for i in range(min(args.show, len(queries))):
            pairs = ", ".join(f"{j}:{s:.4g}" for j, s in zip(ids[i], scores[i], strict=True))
            print(f"query {i}: {pairs}")
    return 0
