"""PEFT adapters (LoRA, DoRA, IA3, ...) on the embedder's model: what it runs, saves and loads.

A ``peft.PeftModel`` is not run through its own ``forward``: over an ``AutoModelForCausalLM`` that returns
logits, and its ``forward(*args, **kwargs)`` hides ``position_ids`` (so packed batches and RoBERTa-style
offsets would be lost). Adapters that inject layers (every kind but prompt learning) live inside the
transformers model itself, so the embedder runs that model's backbone, adapters included, and keeps the
``PeftModel`` only to save and load the adapter (PEFT's own format: ``adapter_config.json`` +
``adapter_model.safetensors``, which ``PeftModel.from_pretrained`` also reads).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from torch import nn

from llmembed_fast import _deps

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` (duck-typed: peft is imported only when one is given)."""
    return isinstance(model, nn.Module) and callable(getattr(model, "get_base_model", None)) and isinstance(
        getattr(model, "peft_config", None), dict
    )


def backbone(peft_model: nn.Module) -> nn.Module:
    """The transformers model under ``peft_model`` (its adapter layers in place), without an LM head.

    Raises ValueError for prompt-learning adapters (prefix / prompt tuning, P-tuning): they change the
    inputs inside ``PeftModel.forward``, which the embedder does not call."""
    for name, cfg in peft_model.peft_config.items():
        if getattr(cfg, "is_prompt_learning", False):
            raise ValueError(
                f"model: the PEFT adapter {name!r} ({type(cfg).__name__}) is prompt learning, which edits "
                "the inputs inside PeftModel.forward; LLMEmbedder runs the model under it and supports "
                "adapters that inject layers (LoRA, DoRA, IA3, LoHa, LoKr, ...)"
            )
    inner = peft_model.get_base_model()
    base = getattr(inner, "base_model", inner)  # transformers' backbone of a *ForCausalLM (else itself)
    return base if isinstance(base, nn.Module) else inner


def has_native_adapter(model: nn.Module) -> bool:
    """True for a transformers model given an adapter by its own ``add_adapter`` / ``load_adapter``."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def check_attached(peft_model: nn.Module, module: nn.Module) -> None:
    """ValueError unless ``module`` is still the model under ``peft_model`` with its adapter layers (a
    ``merge_and_unload()`` called on the PeftModel directly leaves plain layers behind)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if backbone(peft_model) is not module or not any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise ValueError(
            "the embedder's model is no longer under its PeftModel with adapter layers (merged or replaced "
            "outside the embedder): use LLMEmbedder.merge_adapter() to merge, or build a new LLMEmbedder"
        )


def _prefix(peft_model: nn.Module, module: nn.Module) -> str:
    """``module``'s name inside ``peft_model`` plus a dot (the prefix of its keys in the PeftModel)."""
    for name, m in peft_model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("the embedder's model is no longer inside its PeftModel (was it merged or replaced?)")


def active_name(peft_model: nn.Module) -> str:
    """The PeftModel's one active adapter (ValueError when several are active at once)."""
    name = peft_model.active_adapter
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"the PeftModel has several active adapters {list(name)}: activate one "
                             "(set_adapter) to save it, or merge them")
        name = name[0]
    return name


def over_lm_head(peft_model: nn.Module, module: nn.Module) -> bool:
    """Whether the PeftModel wraps a model with a head (``*ForCausalLM``) around ``module``, the backbone:
    its adapter keys then carry the head model's prefix, and it reloads only over that class."""
    return peft_model.get_base_model() is not module


def save(peft_model: nn.Module, module: nn.Module, path: str, state_dict: dict | None) -> None:
    """Write the active adapter of ``peft_model`` to ``path`` itself in PEFT's format (PEFT puts an adapter
    not named "default" in a subfolder; here the folder holds one adapter, whatever its name).
    ``state_dict``: ``module``'s tensors (keys relative to it, e.g. gathered from FSDP shards), which
    replace the PeftModel's own (a head's adapter, outside ``module``, keeps its own)."""
    name = active_name(peft_model)
    kwargs = {"selected_adapters": [name]}
    if state_dict is not None:
        prefix = _prefix(peft_model, module)
        full = dict(peft_model.state_dict())
        full.update({prefix + k: v for k, v in state_dict.items()})
        kwargs["state_dict"] = full
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=path)
    try:
        peft_model.save_pretrained(tmp, **kwargs)
        src = tmp if name == "default" else os.path.join(tmp, name)
        for f in os.listdir(src):
            if os.path.isfile(os.path.join(src, f)):
                os.replace(os.path.join(src, f), os.path.join(path, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_no_stray_layers(module: nn.Module) -> None:
    """ValueError when ``module`` holds PEFT adapter layers but neither a PeftModel nor transformers' own
    adapter owns them (``get_peft_model(emb.model, ...)`` after the embedder was built): its
    ``save_pretrained`` would write their keys as model weights, which no loader reads back."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # none loaded: no adapter layer can exist
    if tuners is None or has_native_adapter(module):
        return
    if any(isinstance(m, tuners.BaseTunerLayer) for m in module.modules()):
        raise ValueError(
            "the model holds PEFT adapter layers that no PeftModel of this embedder owns (was get_peft_model "
            "applied to emb.model?): build the embedder from the PeftModel, LLMEmbedder(peft_model, "
            "tokenizer), so that its adapter is saved and loaded as one"
        )


def check_mergeable(peft_model: nn.Module, module: nn.Module) -> None:
    """ValueError when an adapted layer's weight is the input embedding's own (a tied LM head with an
    adapter): merging it would change the embeddings the backbone computes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if weight is None:
        return
    for name, m in peft_model.get_base_model().named_modules():
        base = m.get_base_layer() if isinstance(m, BaseTunerLayer) else None
        if base is not None and base is not emb and getattr(base, "weight", None) is weight:
            raise ValueError(
                f"merge_adapter: the adapted layer {name!r} shares its weight with the input embeddings "
                "(tied weights); merging would change the embeddings. Save the adapter instead"
            )


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_config(path: str) -> dict:
    """The folder's ``adapter_config.json`` as a dict (ValueError naming the folder when unreadable)."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"path_or_id: unreadable {ADAPTER_CONFIG} in {path!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"path_or_id: {ADAPTER_CONFIG} in {path!r} is not a PEFT adapter config")
    return cfg


def base_model_path(path: str, cfg: dict) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``); FileNotFoundError when none."""
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise FileNotFoundError(
            f"path_or_id: the adapter in {path!r} names no base model (base_model_name_or_path in "
            f"{ADAPTER_CONFIG}); load the base with transformers, wrap it with "
            "peft.PeftModel.from_pretrained and pass it to LLMEmbedder(...)"
        )
    return base


def wants_lm_head(cfg: dict, saved: dict | None) -> bool:
    """Whether the adapter's keys were written under an ``AutoModelForCausalLM``: as this package's settings
    file says (``saved``), else a CAUSAL_LM task or a ``*ForCausalLM`` base class in the adapter config."""
    if saved is not None and "adapter_over_lm_head" in saved:
        return bool(saved["adapter_over_lm_head"])
    if cfg.get("task_type") == "CAUSAL_LM":
        return True
    mapping = cfg.get("auto_mapping")
    base_class = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return isinstance(base_class, str) and base_class.endswith("ForCausalLM")


def _peft():
    try:
        import peft
    except ImportError as exc:
        _deps.raise_missing(exc, "peft", "peft", "an adapter (PEFT) folder")
    return peft


def load_into(base_model: nn.Module, path: str, *, is_trainable: bool = False) -> nn.Module:
    """``peft.PeftModel.from_pretrained(base_model, path)``, checked: every tensor of the folder's adapter
    must have reached the model (PEFT only warns when keys do not fit, e.g. an adapter written over another
    model class)."""
    peft = _peft()
    from safetensors import safe_open

    pm = peft.PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
    with safe_open(_weights_file(path, "path_or_id"), framework="pt") as f:  # the names only
        _check_fits(pm, set(f.keys()), active_name(pm), path, "path_or_id")
    return pm


def _weights_file(path: str, what: str) -> str:
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{what}: {path!r} holds no {ADAPTER_WEIGHTS}")
    return file


def _check_fits(model: nn.Module, keys: set, name: str, path: str, what: str) -> None:
    """ValueError naming ``what`` unless ``keys`` are exactly the adapter ``name``'s tensors in ``model``."""
    want = set(_peft().get_peft_model_state_dict(model, adapter_name=name))
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        raise ValueError(
            f"{what}: the adapter in {path!r} does not fit this model: {len(missing)} of its tensors missing "
            f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]}); was it written over another "
            "model class (AutoModel vs AutoModelForCausalLM) or another adapter config?"
        )


def load(model: nn.Module, path: str, *, what: str = "path") -> None:
    """Load the adapter weights of the folder ``path`` into ``model`` in place (a ``PeftModel``, or a
    transformers model with its own adapter; the active adapter); ValueError naming ``what`` when a tensor
    has no place there or a place is left unfilled."""
    from safetensors.torch import load_file

    saved = load_file(_weights_file(path, what))
    if is_peft_model(model):
        name = active_name(model)
    else:  # transformers writes its own adapters' keys as a PeftModel over it would ("base_model.model.")
        name = model.active_adapters()[0]
        saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    _check_fits(model, set(saved), name, path, what)
    result = _peft().set_peft_model_state_dict(model, saved, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{what}: adapter tensors with no place in this model: {unexpected[:3]}")
