"""sentence-transformers / transformers names across the versions the tests run under.

sentence-transformers 5.4 moved its modules (``sentence_transformers.base``, ``.sentence_transformer``,
``.util.quantization``); 5.1 keeps them in ``sentence_transformers.models`` / ``.losses`` /
``.quantization``. The tests import through these helpers so that they run under both (transformers 5 with
sentence-transformers 6, transformers 4 with sentence-transformers 5.1 or 5.7).
"""

from __future__ import annotations

import importlib


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def st_old_layout() -> bool:
    """Whether this sentence-transformers predates its ``sentence_transformers.base`` layout (5.1 and older;
    5.7 already has it): the behaviour the tests compare with follows the layout, not the major version
    (that layout brought flattened batches, unstripped texts, Normalize keys, ``directions=``, ...)."""
    import importlib.util

    return importlib.util.find_spec("sentence_transformers.base") is None


def st_has_gradcache() -> bool:
    """Whether this sentence-transformers has ``base.losses.gradcache`` (5.7, 6): the ``uses_gradient_cache``
    marker, and mini-batches trimmed of their trailing padding."""
    import importlib

    try:
        importlib.import_module("sentence_transformers.base.losses.gradcache")
    except ImportError:
        return False
    return True


def st_5_4_to_5_6() -> bool:
    """sentence-transformers 5.4 - 5.6: the new layout without ``base.losses.gradcache``. Their Pooling
    follows other rules for prompts, flattened batches and left-padded weightedmean than the fused head does,
    so ``accelerate()`` keeps it (its self-check finds the difference); not run in CI."""
    return not st_old_layout() and not st_has_gradcache()


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


def st_normalize_has_keys() -> bool:
    """Whether this sentence-transformers' Normalize takes module_input_name / module_output_name (6)."""
    import inspect

    return "module_input_name" in inspect.signature(st_normalize().__init__).parameters


def st_normalize():
    return _first(
        "sentence_transformers.base.modules.normalize.Normalize",
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
        "sentence_transformers.models.Normalize",
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


def st_strips_texts() -> bool:
    """Whether this sentence-transformers strips each text before tokenizing it (5.1's
    ``Transformer.tokenize`` does, the prompt it measures for ``prompt_length`` included: a trailing space is
    not tokenized, and a prompt's trailing newline is pooled as text); 6 tokenizes texts as given, as
    LLMEmbedder does."""
    return st_old_layout()


def st_texts(texts: list[str]) -> list[str]:
    """``texts`` as this sentence-transformers tokenizes them: what LLMEmbedder must encode to match it."""
    return [t.strip() for t in texts] if st_strips_texts() else list(texts)


def st_prompt(prompt: str) -> str:
    """``prompt`` for a test comparing LLMEmbedder's prompt exclusion with this sentence-transformers': under
    5.x without its trailing whitespace (which 5.x leaves out of ``prompt_length`` but tokenizes in the
    text), so that both exclude the same tokens."""
    return prompt.rstrip() if st_strips_texts() else prompt


def st_has_flat_batches() -> bool:
    """Whether this sentence-transformers pools flattened (flash-attention varlen, ``cu_seq_lens_q``)
    batches: 6 does; 5.x has no such features (its Pooling reads ``[1, T, H]`` as one sequence)."""
    return hasattr(st_pooling(), "_forward_flattened")
