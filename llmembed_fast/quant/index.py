"""``Index``: binary (or int8) codes searched exactly, then the top candidates rescored with the float
query."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from llmembed_fast import _warn
from llmembed_fast.quant._args import (
    as_ranges,
    as_tensor,
    check_2d,
    check_finite,
    check_float,
    check_k,
    check_range_values,
    to_output,
)
from llmembed_fast.quant.codes import calibrate, quantize, scalar_params
from llmembed_fast.quant.io import IndexFileError, read_index_file, write_index_file
from llmembed_fast.quant.search import fold_query, hamming_topk, int8_topk, score_rows, unfold_scores

PRECISIONS = ("binary", "int8")
RESCORES = (None, "int8", "float")

__all__ = ["Index", "IndexFileError"]


def _check_width(ranges: torch.Tensor) -> torch.Tensor:
    """``ranges`` when ``quantize`` can use them: within float32's range, every max - min finite there
    (else ValueError: the steps would overflow and every code be the same, silently)."""
    scalar_params(ranges.numpy(), np.dtype(np.float32))
    return ranges


class Index:
    """A flat index over quantized embeddings (CPU), searched exactly.

    precision="binary": packed sign bits (D/8 bytes per vector) searched by Hamming distance;
    precision="int8": int8 codes (D bytes) searched by inner product with the float query.
    rescore=None | "int8" | "float": keep int8 codes (D bytes) or float32 vectors (4D bytes) as well, and
    rescore the ``k * rescore_multiplier`` first-stage candidates with the float query.
    ranges: int8 ranges [2, D] (list, numpy array or tensor; float16/bfloat16 are widened to float32);
    None calibrates them on the first ``add``.

    Scores (higher is better): binary without rescoring, D - 2 * hamming (the dot product of +-1 vectors);
    otherwise the float inner product of the query with the dequantized codes / the stored vectors.
    """

    def __init__(self, dim: int, precision: str = "binary", rescore: str | None = None, ranges=None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be a positive int, got {type(dim).__name__} {dim!r}")
        if dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if rescore not in RESCORES:
            raise ValueError(f"rescore must be one of {RESCORES}, got {rescore!r}")
        if precision == "int8" and rescore == "int8":
            raise ValueError(
                'rescore="int8" needs precision="binary" (int8 search is already exact on int8 codes)'
            )
        if (precision == "int8" or rescore == "int8") and dim > 65536:
            raise ValueError(f"dim: int8 codes support at most 65536 dimensions, got {dim}")
        self.dim, self.precision, self.rescore = int(dim), precision, rescore
        self.ranges: torch.Tensor | None = None
        if ranges is not None:
            r = as_ranges(ranges, self.dim).cpu()
            check_range_values(r)
            r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32, copy=True)
            self.ranges = _check_width(r)
        self._parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._stored()}
        self._count = 0
        # add() appends parts, a search merges them: one at a time (searches alone share the merged data)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # copy / deepcopy / pickle (multiprocessing): the lock is not state
        with self._lock:
            state = self.__dict__.copy()
            # lists of their own: a copy's add() appends there, not to this index (the tensors are shared,
            # never written in place)
            state["_parts"] = {name: list(parts) for name, parts in self._parts.items()}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ storage
    def _stored(self) -> list[str]:
        names = ["bits"] if self.precision == "binary" else ["int8"]
        if self.rescore == "int8":
            names.append("int8")
        elif self.rescore == "float":
            names.append("float")
        return names

    def _needs_ranges(self) -> bool:
        return "int8" in self._stored()

    def _data(self, name: str) -> torch.Tensor:
        with self._lock:
            return self._merged(name)

    def _merged(self, name: str) -> torch.Tensor:
        """The parts of ``name`` as one tensor (merged once, kept); the caller holds the lock."""
        parts = self._parts[name]
        if len(parts) != 1:
            width = (self.dim + 7) // 8 if name == "bits" else self.dim
            dtype = {"bits": torch.uint8, "int8": torch.int8, "float": torch.float32}[name]
            merged = torch.cat(parts) if parts else torch.empty(0, width, dtype=dtype)
            self._parts[name] = [merged]
        return self._parts[name][0]

    def __len__(self) -> int:
        return self._count

    @property
    def ntotal(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """Bytes of codes and vectors held."""
        return sum(t.numel() * t.element_size() for parts in self._parts.values() for t in parts)

    def __repr__(self) -> str:
        return (
            f"Index(dim={self.dim}, precision={self.precision!r}, rescore={self.rescore!r}, "
            f"count={self._count})"
        )

    # ------------------------------------------------------------------ add / search
    def _check_embeddings(self, x, name: str) -> tuple[torch.Tensor, bool]:
        t, was_np = as_tensor(x, name)
        check_2d(t, name)
        check_float(t, name)
        if t.shape[1] != self.dim:
            raise ValueError(f"{name} have {t.shape[1]} dimensions, the index {self.dim}: dimension mismatch")
        check_finite(t, name)  # NaN would poison calibrated ranges, codes and every search bound
        if t.dtype == torch.float64 and t.numel():
            big = float(t.detach().abs().max())
            if big > torch.finfo(torch.float32).max:
                raise ValueError(f"{name} hold values beyond float32's range (|x| up to {big:.3g}): "
                                 "the index stores float32 ranges and vectors")
        return t.detach().cpu(), was_np

    def add(self, embeddings) -> Index:
        """Append ``embeddings [N, dim]`` (float); their ids continue from ``len(self)``. Returns self."""
        x, _ = self._check_embeddings(embeddings, "embeddings")
        if x.shape[0] == 0:
            return self
        with self._lock:
            if self._needs_ranges() and self.ranges is None:
                r = calibrate(x)
                self.ranges = _check_width(r)  # float32 or float64
                flat = int((self.ranges[0] == self.ranges[1]).sum())
                if flat:
                    _warn.warn(
                        f"the int8 ranges were calibrated on this first add() of {x.shape[0]} row(s), and "
                        f"{flat} of {self.dim} dimensions have max == min there: later rows are quantized "
                        "in steps of 1 along them, which loses most of their precision. Pass ranges= "
                        "(quant.calibrate on a representative sample) or add a representative batch first")
            parts = {}
            for name in self._stored():
                if name == "bits":
                    parts[name] = quantize(x, "ubinary")
                elif name == "int8":
                    parts[name] = quantize(x, "int8", ranges=self.ranges)
                else:
                    # a copy: the caller may reuse its buffer (x shares numpy / float32 memory)
                    parts[name] = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            for name, part in parts.items():
                self._parts[name].append(part)
            self._count += x.shape[0]
        return self

    def search(self, query_embeddings, k: int, rescore_multiplier: int = 4):
        """The k best vectors for each query: ``(scores float32 [Q, k], ids int64 [Q, k])``, best first,
        equal scores by lower id. With rescoring, the first stage keeps ``k * rescore_multiplier``
        candidates (at most len(self))."""
        q, was_np = self._check_embeddings(query_embeddings, "query_embeddings")
        k = check_k(k, self._count)
        if isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, (int, np.integer)):
            kind = type(rescore_multiplier).__name__
            raise TypeError(f"rescore_multiplier must be an int >= 1, got {kind}")
        if rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be an int >= 1, got {rescore_multiplier!r}")
        kc = k if self.rescore is None else min(self._count, k * int(rescore_multiplier))
        if self.precision == "binary":
            dist, cand = hamming_topk(quantize(q, "ubinary"), self._data("bits"), kc)
            if self.rescore is None:
                return to_output((self.dim - 2 * dist).to(torch.float32), was_np), to_output(cand, was_np)
        else:
            s, cand = int8_topk(q, self._data("int8"), self.ranges, kc)
            if self.rescore is None:
                return to_output(s, was_np), to_output(cand, was_np)
        scores, ids = self._rescore(q, cand, k)
        return to_output(scores, was_np), to_output(ids, was_np)

    def _rescore(self, q: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float64 scores of the candidates, best k by (score desc, id asc). Each score has one fixed
        summation order (the C++ rescoring of int8_topk), whatever the candidate's position: equal vectors
        score bitwise equal and come back by id, whatever k and rescore_multiplier."""
        cand = cand.contiguous()
        bias = exp = None
        if self.rescore == "int8":  # as int8_topk scores: bias + (query * step) . u
            w, bias, exp = fold_query(q, self.ranges)
            scores = score_rows(w, self._data("int8"), cand)
        else:
            w = q.to(torch.float64).contiguous()
            scores = score_rows(w, self._data("float"), cand)
        # ranked before the per-query bias is added (as int8_topk does): adding it first could round
        # distinct scores to equal ones, which would then be ordered by id
        by_id = torch.sort(cand, dim=1, stable=True)
        scores, cand = scores.gather(1, by_id.indices), by_id.values
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        scores, ids = scores.gather(1, order), cand.gather(1, order)
        if bias is not None:
            scores = unfold_scores(scores + bias[:, None], exp)
        return scores.to(torch.float32), ids

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (see llmembed_fast.quant.io for the format)."""
        with self._lock:  # one consistent snapshot: an add() running meanwhile is in it wholly or not at all
            sections = {name: self._merged(name).numpy() for name in self._stored()}
            if self.ranges is not None:
                sections["ranges"] = self.ranges.numpy()
            count = self._count
        meta = {"dim": self.dim, "count": count, "precision": self.precision, "rescore": self.rescore}
        write_index_file(path, meta, sections)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> Index:
        """Read an index written by ``save``. ``mmap`` maps the codes instead of reading them; ``verify``
        checks the file's CRC32 (reads it once). Raises IndexFileError for invalid files."""
        meta, arrays = read_index_file(path, mmap=mmap, verify=verify)
        path = os.fspath(path)
        dim, count = meta.get("dim"), meta.get("count")
        precision, rescore = meta.get("precision"), meta.get("rescore")
        if (
            not isinstance(dim, int)
            or isinstance(dim, bool)
            or dim < 1
            or not isinstance(count, int)
            or isinstance(count, bool)
            or count < 0
            or precision not in PRECISIONS
            or rescore not in RESCORES
            or (precision == "int8" and rescore == "int8")
        ):
            raise IndexFileError(f"{path}: invalid index header {meta!r}")
        try:  # a header the constructor refuses (an int8 index wider than the scan allows) is a bad file
            index = cls(dim, precision, rescore)
        except ValueError as exc:
            raise IndexFileError(f"{path}: invalid index header {meta!r}: {exc}") from None
        expect = {
            "bits": ("uint8", [count, (dim + 7) // 8]),
            "int8": ("int8", [count, dim]),
            "float": ("float32", [count, dim]),
        }
        for name in index._stored():
            a = arrays.get(name)
            dt, shape = expect[name]
            if a is None or a.dtype.name != dt or list(a.shape) != shape:
                raise IndexFileError(f"{path}: section {name!r} missing or not {dt} {shape}")
            if name == "float" and verify and not bool(np.isfinite(a).all()):  # add() refuses such vectors
                raise IndexFileError(f"{path}: section 'float' holds NaN or inf")
            index._parts[name] = [torch.from_numpy(a)]
        r = arrays.get("ranges")
        if r is not None:
            if r.dtype.name not in ("float32", "float64") or list(r.shape) != [2, dim]:
                raise IndexFileError(f"{path}: section 'ranges' is not float32/float64 [2, {dim}]")
            index.ranges = torch.from_numpy(np.array(r))
            try:  # what the constructor would refuse too
                check_range_values(r)
                _check_width(index.ranges)
            except ValueError as exc:
                raise IndexFileError(f"{path}: {exc}") from None
        elif index._needs_ranges() and count > 0:
            raise IndexFileError(f"{path}: int8 codes without their ranges")
        extra = set(arrays) - set(index._stored()) - {"ranges"}
        if extra:
            raise IndexFileError(f"{path}: unexpected sections {sorted(extra)}")
        index._count = count
        return index
