"""sentence-transformers' names on ``LLMEmbedder``: ``encode``'s keyword aliases (``convert_to_tensor``,
``normalize_embeddings``, ``truncate_dim``, ...) with their sentence-transformers meaning, clear errors for
its keywords that have no counterpart here, and the similarity functions (``similarity``,
``similarity_pairwise``, ``similarity_fn_name``)."""

from __future__ import annotations

import numpy as np
import torch

from llmembed_fast.embedder.args import check_bool, check_positive

# sentence-transformers' encode keywords with no counterpart here -> what to do instead
ST_ONLY = {
    "output_value": "LLMEmbedder.encode returns sentence embeddings only (no token embeddings)",
    "device": "the embedder runs where its model is: move it with .to(device), or pass device= to "
              "from_pretrained",
    "pool": "there is no multi-process pool: use encode(..., distributed=True) under torchrun",
    "chunk_size": "there is no multi-process pool: use encode(..., distributed=True) under torchrun",
    "task": "there are no Router modules: use encode_queries / encode_documents (alias encode_query / "
            "encode_document)",
}
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")


def refuse_unknown(kwargs: dict, fn: str) -> None:
    """TypeError for the first keyword in ``kwargs``: what to do instead for a sentence-transformers one."""
    for name in kwargs:
        if name in ST_ONLY:
            raise TypeError(f"{fn}() does not take sentence-transformers' {name}=: {ST_ONLY[name]}")
        raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")


def resolve_output(output, convert_to_tensor, convert_to_numpy) -> str:
    """``output`` ("numpy" / "torch") from it and sentence-transformers' ``convert_to_tensor`` (True wins, as
    there) / ``convert_to_numpy`` (False: a tensor); ValueError when they disagree."""
    convert_to_tensor = check_bool(convert_to_tensor, "convert_to_tensor")
    convert_to_numpy = check_bool(convert_to_numpy, "convert_to_numpy")
    implied = None
    if convert_to_tensor:
        implied = "torch"
    elif convert_to_numpy is not None:
        implied = "numpy" if convert_to_numpy else "torch"
    elif convert_to_tensor is False:
        implied = "numpy"
    if output is None:
        return implied or "numpy"
    if implied is not None and implied != output:
        raise ValueError(
            f"output={output!r} disagrees with convert_to_tensor={convert_to_tensor} / "
            f"convert_to_numpy={convert_to_numpy}: give one of them"
        )
    return output


def resolve_normalize(normalize, normalize_embeddings) -> tuple[bool | None, bool]:
    """(``normalize``, whether to L2-normalize after ``truncate_dim``): sentence-transformers'
    ``normalize_embeddings=True`` normalizes the output once truncated (a folder's Normalize acts before);
    False adds no normalization of its own. ValueError with ``normalize=False`` beside True."""
    normalize = check_bool(normalize, "normalize")
    normalize_embeddings = check_bool(normalize_embeddings, "normalize_embeddings")
    if normalize_embeddings and normalize is False:
        raise ValueError("normalize=False disagrees with normalize_embeddings=True: give one of them")
    return normalize, bool(normalize_embeddings)


def check_truncate_dim(value, width: int | None, name: str = "truncate_dim") -> int | None:
    """``truncate_dim``: None or a positive int at most the embeddings' width (when known)."""
    value = check_positive(value, name)
    if value is not None and width is not None and value > width:
        raise ValueError(f"{name} must be at most the embedding width {width}, got {value}")
    return value


def check_similarity_fn_name(value) -> str | None:
    """None or one of SIMILARITY_FNS (sentence-transformers' ``SimilarityFunction`` members are strings)."""
    if value is None:
        return None
    name = getattr(value, "value", value)
    if not isinstance(name, str) or name not in SIMILARITY_FNS:
        raise ValueError(f"similarity_fn_name must be one of {SIMILARITY_FNS} or None, got {value!r}")
    return name


def _as_2d(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor of embeddings, got {type(x).__name__}")
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D] or [D], got shape {tuple(x.shape)}")
    return x if x.dtype == torch.float64 else x.float()


def _operands(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_2d(a, "embeddings1"), _as_2d(b, "embeddings2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings1 and embeddings2 differ in width: {a.shape[1]} vs {b.shape[1]}")
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    return a, b


def similarity(a, b, name: str) -> torch.Tensor:
    """[N, M] similarities of rows of ``a`` [N, D] with rows of ``b`` [M, D] (1-D inputs count as one row):
    cosine, dot, or the negative euclidean / manhattan distance (larger is more similar), float32 (float64
    for float64 inputs), as sentence-transformers' ``similarity``."""
    a, b = _operands(a, b)
    if name == "cosine":
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    if name == "dot":
        return a @ b.T
    return -torch.cdist(a, b, p=2.0 if name == "euclidean" else 1.0)


def similarity_pairwise(a, b, name: str) -> torch.Tensor:
    """[N] similarities of row i of ``a`` with row i of ``b`` (both [N, D])."""
    a, b = _operands(a, b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"embeddings1 and embeddings2 differ in rows: {a.shape[0]} vs {b.shape[0]}")
    if name == "cosine":
        return (torch.nn.functional.normalize(a, dim=1) * torch.nn.functional.normalize(b, dim=1)).sum(1)
    if name == "dot":
        return (a * b).sum(1)
    return -(a - b).norm(p=2.0 if name == "euclidean" else 1.0, dim=1)
