"""Argument checks and name resolution shared by ``LLMEmbedder`` and late chunking (each error names its
argument)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from llmembed_fast.embedder.st_folder import ST_POOLING
from llmembed_fast.ops.pooling import POOLING_MODES

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
QUANTIZED = ("int8", "uint8", "binary", "ubinary")
OUTPUTS = ("numpy", "torch")
POOLING_ALIASES = {
    **ST_POOLING,
    "cls_token": "first",
    "last_token": "last",
    "eos": "last",
    "mean_tokens": "mean",
    "max_tokens": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean_tokens": "weighted_mean",
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_pooling(pooling) -> str:
    """Our pooling name from ours or a sentence-transformers alias (ValueError naming ``pooling``)."""
    if not isinstance(pooling, str):
        raise TypeError(f"pooling must be a string, got {type(pooling).__name__}")
    name = POOLING_ALIASES.get(pooling, pooling)
    if name not in POOLING_MODES:
        raise ValueError(
            f"pooling must be one of {POOLING_MODES} (or a sentence-transformers name such as "
            f"'lasttoken', 'cls', 'weightedmean'), got {pooling!r}"
        )
    return name


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, or the floating-point torch dtype ``dtype`` names (a torch.dtype or one of DTYPES' names)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype for the model's weights, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def check_text(t, name: str) -> None:
    if not isinstance(t, str):
        hint = " (decode it first, e.g. .decode('utf-8'))" if isinstance(t, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a string, got {type(t).__name__}{hint}")
    if not t.isascii():
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name} cannot be tokenized: {exc.reason} at character {exc.start} "
                f"({t[exc.start : exc.end]!r}); it is not valid Unicode text"
            ) from None


def check_texts(texts) -> tuple[list[str], bool]:
    """(the texts as a non-empty list, whether ``texts`` was one string)."""
    if isinstance(texts, str):
        check_text(texts, "texts")
        return [texts], True
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError(
            f"texts must be a string or a list of strings, got {type(texts).__name__} "
            "(decode it first, e.g. texts.decode('utf-8'))"
        )
    pandas = type(texts).__module__.startswith("pandas") and hasattr(texts, "tolist")  # a Series, an Index
    if isinstance(texts, np.ndarray) or pandas:
        texts = texts.tolist()  # a 0-d array gives its one string: one text, not one per character
        if isinstance(texts, str):
            return [texts], True
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts must not be empty")
    for i, t in enumerate(texts):
        check_text(t, f"texts[{i}]")
    return texts, False


def check_bool(value, name: str):
    if value is None or isinstance(value, (bool, np.bool_)):
        return value if value is None else bool(value)
    raise TypeError(f"{name} must be True, False or None, got {value!r}")


def check_device(device, name: str = "device") -> torch.device | None:
    """``device`` (None, a torch.device, a string such as "cuda:1", or a CUDA index) as a torch.device;
    TypeError / ValueError naming ``name`` instead of torch's own errors."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a string ('cuda:0') or an index, got {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name}: {device!r} is not a torch device ({exc})") from None


def check_default_prompt_name(name, prompts: dict[str, str]) -> str | None:
    """``default_prompt_name``: None or the name of one of ``prompts`` (sentence-transformers refuses others
    when the model is built too; later, every encode would fail naming an argument it was not given)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"default_prompt_name must be a string or None, got {type(name).__name__}")
    if name not in prompts:
        raise ValueError(f"default_prompt_name {name!r} is not one of the prompts {sorted(prompts)}")
    return name


def check_prompts(prompts) -> dict[str, str]:
    """A copy of ``prompts``: a mapping of prompt names to prompt strings (None: no prompts)."""
    if prompts is None:
        return {}
    if not isinstance(prompts, Mapping):
        raise TypeError(
            "prompts must be a mapping of prompt names to prompt strings (e.g. {'query': 'query: '}), "
            f"got {type(prompts).__name__}"
        )
    for name, text in prompts.items():
        if not isinstance(name, str):
            raise TypeError(f"prompts: names must be strings, got {name!r} ({type(name).__name__})")
        if not isinstance(text, str):
            raise TypeError(f"prompts[{name!r}] must be a string, got {type(text).__name__}")
    return dict(prompts)


def check_output_args(precision, output, ranges, calibration_embeddings) -> None:
    """The checks ``encode`` and ``encode_late_chunks`` make of ``precision``, ``output`` and the int8/uint8
    calibration arguments (``ranges`` / ``calibration_embeddings`` with another precision are refused: they
    would be ignored)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if precision not in ("int8", "uint8"):
        for name, value in (("ranges", ranges), ("calibration_embeddings", calibration_embeddings)):
            if value is not None:
                raise ValueError(
                    f"{name} applies to precision 'int8' / 'uint8' only (it sets their per-dimension "
                    f"ranges), got precision={precision!r}"
                )


def check_positive(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)
