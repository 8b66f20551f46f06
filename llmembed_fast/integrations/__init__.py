"""Integrations with other libraries, imported on first use so that those libraries stay optional.

``llmembed_fast.integrations.sentence_transformers.accelerate(model)``: the fused head in a
sentence-transformers model's Pooling/Normalize, in place. Other submodules: ``st_losses`` (losses for the
sentence-transformers trainer), ``hf_trainer`` (Hugging Face Trainer hook).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("sentence_transformers", "st_losses", "hf_trainer")


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
