"""sentence-transformers / transformers names across the versions the tests run under.

sentence-transformers 6 moved its modules (``sentence_transformers.base``, ``.sentence_transformer``,
``.util.quantization``); 5.x keeps them in ``sentence_transformers.models`` / ``.losses`` /
``.quantization``. The tests import through these helpers so that they run under both (transformers 5 with
sentence-transformers 6, transformers 4 with sentence-transformers 5).
"""

from __future__ import annotations

import importlib


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def st_version() -> tuple[int, int]:
    import sentence_transformers

    major, minor = sentence_transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def _first(*names: str):
    err = None
    for name in names:
        mod, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            err = exc
    raise ImportError(f"none of {names} importable") from err


def st_transformer():
    return _first(
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.models.Transformer",
    )


def st_pooling():
    return _first(
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.models.Pooling",
    )


def st_normalize():
    return _first(
        "sentence_transformers.base.modules.normalize.Normalize", "sentence_transformers.models.Normalize"
    )


def st_loss(name: str):
    """A sentence-transformers loss class by name (``CachedMultipleNegativesRankingLoss``, ...)."""
    return _first(
        f"sentence_transformers.sentence_transformer.losses.{name}", f"sentence_transformers.losses.{name}"
    )


def st_quantize_embeddings():
    return _first(
        "sentence_transformers.util.quantization.quantize_embeddings",
        "sentence_transformers.quantization.quantize_embeddings",
    )


def embedding_dimension(transformer_module) -> int:
    """The token-state width of an ST Transformer module (renamed in sentence-transformers 6)."""
    fn = getattr(transformer_module, "get_embedding_dimension", None)
    return (fn or transformer_module.get_word_embedding_dimension)()
