"""What the embedder reads from a Hugging Face model and its config: the module to run, its output, its
position table, and whether it attends causally."""

from __future__ import annotations

import torch
from torch import nn

from llmembed_fast import _warn


def dtype_kwarg() -> str:
    """The name ``from_pretrained`` takes the weights' dtype by: ``dtype`` from transformers 4.56 on
    (``torch_dtype`` is deprecated there), ``torch_dtype`` before (where ``dtype`` reaches the model's
    ``__init__`` and fails)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def max_positions(config) -> int | None:
    """The longest sequence the model's position table holds (max_position_embeddings / n_positions)."""
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def rotary_positions(config) -> bool:
    """True for rotary position encodings (no table to index past: a longer max_length runs, with
    whatever quality the model has beyond its training length).

    GPT-J and CodeGen (``rotary_dim``) are rotary but count as not: their transformers implementation
    precomputes ``n_positions`` rows of sin/cos and indexes them, so a longer sequence fails there
    (IndexError; a device assert on CUDA) as a learned table would."""
    keys = ("rope_theta", "rope_scaling", "rope_parameters")
    return any(getattr(config, k, None) is not None for k in keys)


def rope_switch_positions(config) -> int | None:
    """For rotary encodings whose frequencies follow the longest sequence of a batch (transformers'
    "dynamic" NTK and "longrope": one set for the whole batch once its longest sequence passes the original
    length), that length; None otherwise. A shorter sequence batched with a longer one would be embedded
    with the long set."""
    for key in ("rope_scaling", "rope_parameters"):
        params = getattr(config, key, None)
        if not isinstance(params, dict):
            continue
        for p in [params, *(v for v in params.values() if isinstance(v, dict))]:  # per layer type too
            if p.get("rope_type", p.get("type")) in ("dynamic", "longrope"):
                n = p.get("original_max_position_embeddings") or getattr(
                    config, "original_max_position_embeddings", None) or max_positions(config)
                return int(n) if n else None
    return None


def is_decoder_model(config) -> bool:
    """True for causal LMs (Llama, Mistral, Qwen2, GPT-2, ...), False for encoders (BERT, ...)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    from transformers.models.auto import modeling_auto as ma

    mt = getattr(config, "model_type", None)
    return mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def causal_attention(config) -> bool:
    """True when the model attends causally: a decoder (``is_decoder_model``) not switched to bidirectional
    attention (EmbeddingGemma's ``use_bidirectional_attention``, ``is_causal=False``)."""
    if not is_decoder_model(config):
        return False
    # True / "all": every token attends both ways (EmbeddingGemma); Gemma 4's "vision" keeps text causal
    if getattr(config, "use_bidirectional_attention", False) in (True, "all"):
        return False
    return getattr(config, "is_causal", True) is not False


def position_offset(model: nn.Module) -> int:
    """The position id of a sequence's first token: ``padding_idx + 1`` for models whose position table has a
    padding row (RoBERTa, XLM-R, MPNet, CamemBERT, ...: they count positions from there), the first entry of
    the embeddings' ``position_ids`` buffer where it starts above 0 (Nystromformer, YOSO, MRA: from 2),
    else 0."""
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(m, nn.Embedding):
            if m.padding_idx is not None:
                return int(m.padding_idx) + 1
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            ids = getattr(parent, "position_ids", None)
            if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
                return max(0, int(ids.flatten()[0]))
            return 0
    return 0


def output_width(config) -> int | None:
    """Columns of the model's last hidden state: ``config.hidden_size``, or OPT's ``word_embed_proj_dim``
    (OPT-350m projects its output down)."""
    width = getattr(config, "word_embed_proj_dim", None) or getattr(config, "hidden_size", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def encoder_module(model: nn.Module) -> nn.Module:
    """The module to run: the base model without an LM head; a torch.compile'd AutoModel as it is."""
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule wraps the model
    compiled = isinstance(orig, nn.Module) and orig is not model
    inner = orig if compiled else model
    base = getattr(inner, "base_model", inner)
    base = base if isinstance(base, nn.Module) else inner
    if not compiled:
        return base
    if base is not inner:
        _warn.warn(
            f"LLMEmbedder runs the base model of the torch.compile'd {type(inner).__name__} (its LM head is "
            "not needed) uncompiled; compile the base model (AutoModel) to run compiled",
        )
        return base
    return model


def last_hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]
