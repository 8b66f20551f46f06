"""llmembed_fast: fast LLM-based text embeddings.

Fused embedding head (pool -> Matryoshka slice -> L2 normalize), flash-style contrastive loss, gradient
caching, int8/binary quantization with exact search, and a Hugging Face decoder wrapper.
See DESIGN.md for the layout; every fast path has a plain-torch reference in ``llmembed_fast.reference``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from llmembed_fast._info import info
from llmembed_fast.modules import EmbeddingHead
from llmembed_fast.ops.pooling import POOLING_MODES, l2_normalize, matryoshka, pool, pool_segments

# Heavier or optional parts load on first use, so ``import llmembed_fast`` stays light.
_LAZY_ATTRS = {
    "contrastive_loss": ("llmembed_fast.ops.contrastive", "contrastive_loss"),
    "ContrastiveLoss": ("llmembed_fast.losses", "ContrastiveLoss"),
    "GradCache": ("llmembed_fast.training", "GradCache"),
    "LLMEmbedder": ("llmembed_fast.embedder", "LLMEmbedder"),
}
_LAZY_MODULES = ("quant", "distributed", "training", "integrations", "reference", "embedder", "losses")


def __getattr__(name: str):
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"llmembed_fast.{name}")
    else:
        raise AttributeError(f"module 'llmembed_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "__version__", "info", "pool", "pool_segments", "l2_normalize", "matryoshka", "EmbeddingHead",
    "POOLING_MODES", *_LAZY_ATTRS, *_LAZY_MODULES,
]
