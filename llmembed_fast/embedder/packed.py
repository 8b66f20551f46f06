"""Padding-free (packed) forward: a batch's sequences concatenated into one row, pooled with pool_segments.

Restarting ``position_ids`` alone do not isolate the sequences under sdpa, flex or eager attention in the
transformers versions this package supports (only the flash-attention varlen path reads them as sequence
boundaries), so the packed row gets its own block-diagonal (and, for decoders, causal) additive 4-D mask.
That mask costs T x T elements, so packed batches should be bounded in tokens (``max_tokens_per_batch``),
and with sdpa it costs attention over the whole row (T^2) rather than per sequence: on GPUs without
flash-attention varlen the padded path with length-sorted batches is usually as fast, which is why
``packed="auto"`` chooses packing only for flash-attention. A custom mask replaces the model's own mask
logic, including its sliding windows: a batch holding a sequence longer than the model's smallest window
therefore runs padded (see ``sliding_window``), where the model applies its windows itself.

Not every model honours a custom mask in the same form: transformers 5 takes the additive [1, 1, T, T]
mask everywhere, transformers 4's BERT-style encoders refuse it and take a 0/1 [1, T, T] one instead, and a
remote-code model may drop either silently. ``probe_mask_kind`` runs two tiny sequences once per model, packed
and apart, and keeps the first form whose packed states equal the separate ones.
"""

from __future__ import annotations

import torch


def block_diagonal_mask(
    cu_seqlens: torch.Tensor, *, causal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive attention mask [1, 1, T, T] on ``device``: 0 where query i may attend key j (same sequence,
    and j <= i when ``causal``), the dtype's most negative value elsewhere. The sequence ids are formed on
    the host from ``cu_seqlens`` [S + 1] (pass it on the CPU: then building the mask never waits on the
    device)."""
    cu = cu_seqlens.cpu()
    T = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1]).to(device)
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    mask = torch.zeros(T, T, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


MASK_KINDS = ("4d", "3d")


def packed_mask(
    cu_seqlens: torch.Tensor, kind: str, *, causal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The packed row's mask in the form ``kind`` names: "4d" the additive [1, 1, T, T] mask of
    :func:`block_diagonal_mask`, "3d" a [1, T, T] mask of ones where attention is allowed (what
    transformers 4's ``get_extended_attention_mask`` turns into the additive one)."""
    mask = block_diagonal_mask(cu_seqlens, causal=causal, dtype=dtype, device=device)
    if kind == "4d":
        return mask
    if kind == "3d":
        return (mask[0] == 0).to(dtype)
    raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")


def probe_mask_kind(run, *, vocab_size: int | None, causal: bool, dtype: torch.dtype, device) -> str | None:
    """The first mask form in :data:`MASK_KINDS` under which ``run(input_ids [1, T], attention_mask,
    position_ids [1, T]) -> hidden [1, T, H]`` gives a packed row of two short sequences the states each
    sequence gets alone, or None when no form does (the model refused the mask or did not isolate the
    sequences). Runs without grad; call it with the model in eval mode.

    "The same states" is judged against what a leak does: the form's error from the separate runs must be
    under 5% of the change that attending over the whole row (a [1, T] mask of ones) makes. An absolute
    tolerance alone would pass a leak in a model with massive activations (a few features of size ~1e4 next
    to ordinary ones of ~1), and rounding alone must not fail a half-precision model."""
    n = max(2, min(int(vocab_size or 100), 100))
    seqs = [[(7 * i + 3) % n for i in range(4)], [(5 * i + 1) % n for i in range(3)]]
    ids = torch.tensor([seqs[0] + seqs[1]], device=device)
    pos = torch.tensor([list(range(len(seqs[0]))) + list(range(len(seqs[1])))], device=device)
    cu = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1])])
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    with torch.no_grad():
        apart = []
        for s in seqs:
            one = torch.tensor([s], device=device)
            apart.append(run(one, torch.ones_like(one), torch.arange(len(s), device=device)[None])[0].float())
        ref = torch.cat(apart, dim=0)
        scale = max(1.0, float(ref.abs().max()))
        try:
            leak = float((run(ids, torch.ones_like(ids), pos)[0].float() - ref).norm())
        except (ValueError, RuntimeError, TypeError, IndexError):
            leak = None
        for kind in MASK_KINDS:
            try:
                got = run(ids, packed_mask(cu, kind, causal=causal, dtype=dtype, device=device), pos)[0]
            except (ValueError, RuntimeError, TypeError, IndexError):  # the model refused this form
                continue
            if got.shape != ref.shape:
                continue
            err = (got.float() - ref).abs()
            if float(err.max()) <= tol * scale and (leak is None or float(err.norm()) <= 0.05 * leak):
                return kind
    return None


def sliding_window(model) -> int | None:
    """The smallest attention window any layer of ``model`` applies, or None when no layer slides.

    transformers' configs say it two ways: ``layer_types`` naming "sliding_attention" layers (Gemma 2/3,
    Qwen2 and others in recent versions), or ``sliding_window`` alone (Mistral, and older Qwen2 whatever its
    ``use_sliding_window`` says: see below). A window counted where the model has none only makes batches
    with longer sequences run padded (the same embeddings)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            cfg = get_text()
        except (TypeError, ValueError, AttributeError):
            pass
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return window if any("sliding" in str(t) for t in layer_types) else None
    # a config without layer_types: transformers before them (4.51's Qwen2) slid its sdpa / eager masks by
    # ``sliding_window`` even where ``use_sliding_window`` is False, so the window counts either way
    return window


def uses_varlen_flash(model) -> bool:
    """True when the model runs a flash-attention implementation that reads packed position_ids."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return impl.startswith("flash_attention") or impl.startswith("kernels-community/flash")
