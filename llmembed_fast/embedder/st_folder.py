"""Read a sentence-transformers model folder: modules, Pooling config, max length, prompts.

Only what the embedder needs, read from the JSON files (sentence-transformers itself is not imported).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# sentence-transformers pooling names (new single-name form and legacy boolean keys) -> ours
ST_POOLING = {
    "cls": "first",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weighted_mean",
    "lasttoken": "last",
}
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class STFolder:
    transformer_path: str
    pooling: str | None = None
    include_prompt: bool = True
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None


def _load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def st_pooling_mode(cfg: dict) -> tuple[str, bool]:
    """(our pooling name, include_prompt) from a sentence-transformers Pooling config dict."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        active = [m for k, m in _LEGACY_KEYS.items() if cfg.get(k)]
        mode = active if active else "mean"
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise ValueError(
                f"pooling modes concatenated ({mode}) are not supported; pass pooling= explicitly"
            )
        mode = mode[0]
    if mode not in ST_POOLING:
        raise ValueError(f"unknown sentence-transformers pooling mode {mode!r}")
    return ST_POOLING[mode], bool(cfg.get("include_prompt", True))


def read_st_folder(path: str) -> STFolder | None:
    """The sentence-transformers configuration in ``path``, or None when it has no ``modules.json``."""
    mpath = os.path.join(path, "modules.json")
    if not os.path.isfile(mpath):
        return None
    out = STFolder(transformer_path=path)
    for mod in _load(mpath):
        kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
        sub = os.path.join(path, mod.get("path", ""))
        if kind == "Transformer":
            out.transformer_path = sub
            cfg_file = os.path.join(sub, "sentence_bert_config.json")
            if os.path.isfile(cfg_file):
                cfg = _load(cfg_file)
                out.max_seq_length = cfg.get("max_seq_length")
                out.do_lower_case = bool(cfg.get("do_lower_case", False))
        elif kind == "Pooling":
            cfg_file = os.path.join(sub, "config.json")
            out.pooling, out.include_prompt = st_pooling_mode(
                _load(cfg_file) if os.path.isfile(cfg_file) else {}
            )
        elif kind == "Normalize":
            out.normalize = True
        else:
            raise ValueError(
                f"sentence-transformers module {mod.get('type')!r} in {mpath} is not supported by "
                "LLMEmbedder (Transformer, Pooling and Normalize are)"
            )
    cfg_file = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(cfg_file):
        cfg = _load(cfg_file)
        out.prompts = dict(cfg.get("prompts") or {})
        out.default_prompt_name = cfg.get("default_prompt_name")
        out.similarity_fn_name = cfg.get("similarity_fn_name")
    return out
