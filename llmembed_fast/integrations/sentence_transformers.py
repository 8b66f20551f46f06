"""sentence-transformers drop-in: ``accelerate(model)`` puts the fused head in its Pooling (and Normalize).

The modules are changed in place by switching their class to a subclass whose ``forward`` calls
:func:`llmembed_fast.pool` / :func:`llmembed_fast.pool_segments` (pooling and prompt exclusion in one pass
over the token states); a Normalize right after it normalizes the pooled float32 vectors before they are
rounded to the output dtype. Configuration and weights are untouched, outputs are the same (float32
accumulation, output in the token states' dtype; a float16 row with no token at all normalizes to zeros,
where sentence-transformers' float16 normalize gives NaN). The Pooling's own output stays unnormalized, so
the module also works where no Normalize follows it (a sub-model built from the accelerated modules).
Cases the fused head does not express exactly fall back to the original code: concatenated pooling
modes, ``token_weights_sum`` / ``seq_idx`` features, ``weightedmean`` over masks that do not start at
position 0 where sentence-transformers weights by absolute position (before 6.2; from 6.2 it counts from each
row's first token, as the fused head does, unless a prompt is cut off or a row has holes), a
``prompt_length`` or an empty text that leaves a sequence with no token to pool (sentence-transformers'
empty-row values), and cls under a prompt in a flattened batch (its answer depends on the version).
``accelerate`` first checks each Pooling: the fused forward must give that Pooling's own outputs on
small batches covering padding, prompts, empty rows and flattened batches; a Pooling that differs (a
sentence-transformers version with other rules, 5.4 - 5.6, or a subclass) is left as it is, with a warning.
``restore(model)`` switches back. An accelerated model saves (``save``, ``save_pretrained``, the trainer's
checkpoints) as the plain model: the folder records sentence-transformers' own Pooling / Normalize and
loads anywhere, without llmembed_fast or ``trust_remote_code``.
"""

from __future__ import annotations

import functools

import torch

from llmembed_fast import _warn
from llmembed_fast._deps import raise_missing
from llmembed_fast.embedder.st_folder import ST_POOLING
from llmembed_fast.ops.pooling import l2_normalize, pool, pool_segments


def _st_modules():
    """sentence-transformers' (Pooling, Normalize) classes where this version keeps them: 6 (Normalize in
    ``base``), 5.4 - 5.7 (both in ``sentence_transformer.modules``), older (``models``)."""
    import importlib

    pooling = "sentence_transformers.sentence_transformer.modules.pooling"
    for p, n in ((pooling, "sentence_transformers.base.modules.normalize"),
                 (pooling, "sentence_transformers.sentence_transformer.modules.normalize"),
                 ("sentence_transformers.models", "sentence_transformers.models")):
        try:
            return importlib.import_module(p).Pooling, importlib.import_module(n).Normalize
        except (ImportError, AttributeError) as exc:
            err = exc
    raise_missing(err, "sentence_transformers", "st", f"{__name__} (accelerate)")


Pooling, Normalize = _st_modules()
# a Pooling before 5.4 has no flattened (varlen) batches: a [1, T, H] batch with cu_seq_lens_q is one sequence
# to it and to the fused head; its cls is the state at position 0 whatever the mask (padding or prompt), left
# to its own code
_LEGACY = not hasattr(Pooling, "_forward_flattened")

# the float32 pooled vectors behind a FusedPooling output in a lower dtype, kept on that output tensor (not in
# the features, which encode(output_value=None) returns) for a FusedNormalize that reads that same tensor next
_POOLED32 = "_llmembed_fast_pooled32"


class FusedPooling(Pooling):
    """sentence-transformers ``Pooling`` computed by the fused head (same config, same outputs)."""

    fuse_normalize: bool = False  # a Normalize follows it (set by accelerate): informational

    def forward(self, features: dict, **kwargs) -> dict:
        modes = _pooling_modes(self)
        if (
            len(modes) != 1
            or "token_weights_sum" in features
            or "seq_idx" in features
            or (modes[0] == "cls" and ("cls_token_embeddings" in features or _LEGACY))
        ):
            return super().forward(features, **kwargs)
        mode = ST_POOLING[modes[0]]
        h = features["token_embeddings"]
        prompt_length = None
        if not self.include_prompt and "prompt_length" in features:
            pl = features["prompt_length"]
            prompt_length = int(pl[0].item()) if isinstance(pl, torch.Tensor) else int(pl)
        if "cu_seq_lens_q" in features and not _LEGACY:  # a flattened (varlen) batch [1, T, H]
            cu = features["cu_seq_lens_q"].to(torch.int64)
            starts, ends = cu[:-1], cu[1:]
            if prompt_length and mode == "first":
                # which token a flat batch's cls is under a prompt changed in sentence-transformers 6.2
                # (position 0 before, the first token after the prompt since): its own code decides
                return super().forward(features, **kwargs)
            if prompt_length is not None and mode not in ("first", "last"):
                # sentence-transformers' flat path drops min(prompt_length, shortest length) tokens of each
                # sequence; weighted_mean keeps absolute weights and empty sequences get its own values
                shortest = int((ends - starts).min().item()) if starts.numel() else 0
                if mode == "weighted_mean" or prompt_length >= shortest:
                    return super().forward(features, **kwargs)
                starts = starts + prompt_length
            flat = h.reshape(-1, h.shape[-1])
            emb = pool_segments(flat, starts, ends, mode, out_dtype=torch.float32)
            if mode in ("first", "last", "max") and flat.shape[0]:
                # its flat indexing: cls the token at the start (clamped: an empty last sequence indexes past
                # the end there), lasttoken the one before it (a neighbour's; wraps)
                t = flat.shape[0]
                at = starts.clamp(max=t - 1) if mode == "first" else (ends - 1) % t
                emb = _st_empty_values(emb, (ends == starts).unsqueeze(1), lambda: flat[at], mode, h.dtype)
        else:
            if "attention_mask" in features and features["attention_mask"].size(-1) == h.size(1):
                mask = features["attention_mask"]
            else:
                mask = torch.ones(h.shape[:-1], dtype=torch.int64, device=h.device)
            if prompt_length is not None:
                mask = _exclude_prompt(mask, prompt_length)
                # a row with nothing left after the prompt: sentence-transformers' values
                if bool((mask.sum(1) == 0).any()):
                    return super().forward(features, **kwargs)
            if mode == "weighted_mean" and mask.shape[1] > 1:
                # a row that does not start at position 0: the fused weights (1, 2, ... over the pooled
                # tokens) are sentence-transformers' only where it counts from each row's first token (6.2+)
                # and the pooled tokens are that row's one contiguous block (no prompt cut off, no holes)
                late_start, one_block = _mask_layout(mask)
                if late_start and (prompt_length or not one_block or not _st_weights_from_first_token()):
                    return super().forward(features, **kwargs)
            emb = pool(h, mask, mode, out_dtype=torch.float32)
            if mode in ("first", "max"):  # cls: the state at position 0
                emb = _st_empty_values(emb, (mask == 0).all(1, keepdim=True), lambda: h[:, 0], mode, h.dtype)
        out = emb.to(h.dtype)
        if out is not emb:
            setattr(out, _POOLED32, emb)
        features["sentence_embedding"] = out
        return features

    def extra_repr(self) -> str:
        return f"fused head (llmembed_fast), normalize fused: {self.fuse_normalize}"


def _st_empty_values(
    emb: torch.Tensor, empty: torch.Tensor, token, mode: str, dtype: torch.dtype
) -> torch.Tensor:
    """``emb`` [B, D] float32 with its rows where ``empty`` [B, 1] (no token to pool: an empty text from a
    tokenizer that adds no special tokens) set as sentence-transformers sets them, where they differ from the
    fused zeros: max its fill value for ``dtype`` states (-inf, NaN once normalized; -1e9 before 6), cls /
    lasttoken ``token()`` [B, D], the state its indexing reads there. Selected on the device: no host sync in
    the encode loop."""
    st = torch.full_like(emb, _st_max_of_nothing(dtype)) if mode == "max" else token().to(emb.dtype)
    return torch.where(empty, st, emb)


def _pooling_modes(m) -> tuple[str, ...]:
    """A Pooling's modes by their config names ("mean", "lasttoken", ...; several when concatenated)."""
    mode = getattr(m, "pooling_mode", None)  # sentence-transformers >= 6: a name or a tuple of names
    if mode is None:  # before: one flag per mode
        return tuple(m.get_pooling_mode_str().split("+"))
    return (mode,) if isinstance(mode, str) else tuple(mode)


def _exclude_prompt(mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """``mask`` [B, L] without the prompt's tokens, as this sentence-transformers' Pooling drops them
    (a copy)."""
    own = getattr(Pooling, "_exclude_prompt_from_mask", None)
    if own is not None:  # 5.4 on: its own function
        return own(mask, prompt_length)
    mask = mask.clone()
    if _st_prompt_after_padding():  # 5.2 - 5.3: the same rule, written inside its forward
        pad = mask.to(torch.int32).argmax(dim=1)
        if bool((pad > 0).any()):
            mask[torch.arange(mask.size(1), device=mask.device)[None] < (pad + prompt_length)[:, None]] = 0
            return mask
    mask[:, :prompt_length] = 0  # 5.1: positions 0 .. prompt_length - 1, whatever the padding
    return mask


@functools.cache
def _st_pools(mode: str, values: tuple, mask: tuple, dtype: torch.dtype = torch.float32,
              prompt_length: int | None = None) -> float:
    """What this sentence-transformers' own Pooling gives one row of one-feature states ``values`` under
    ``mask`` (and a prompt to exclude): how the fused head learns a rule that changed between versions,
    asked once per question."""
    feats = {"token_embeddings": torch.tensor(values, dtype=dtype).reshape(1, -1, 1),
             "attention_mask": torch.tensor([mask])}
    if prompt_length is not None:
        feats["prompt_length"] = prompt_length
    pooling = Pooling(1, pooling_mode=mode, include_prompt=prompt_length is None)
    return float(pooling(feats)["sentence_embedding"].item())


def _st_max_of_nothing(dtype: torch.dtype) -> float:
    """Its max pooling of a row with no token, for ``dtype`` states (-inf in 5.7 and 6; 5.1's -1e9 fill
    rounded to ``dtype``)."""
    return _st_pools("max", (5.0, 5.0), (0, 0), dtype)


def _st_prompt_after_padding() -> bool:
    """Whether its Pooling (one without ``_exclude_prompt_from_mask``) drops the prompt after a row's left
    padding (5.2 - 5.3) or at positions 0 .. prompt_length - 1 (5.1)."""
    # (2 + 4) / 2 after the padding; from position 0: (1 + 2 + 4) / 3
    return abs(_st_pools("mean", (100.0, 1.0, 2.0, 4.0), (0, 1, 1, 1), prompt_length=1) - 3.0) < 1e-6


def _st_weights_from_first_token() -> bool:
    """Whether its weightedmean counts positions from each row's first token (6.2+) rather than from
    position 0."""
    # (1 * 1 + 2 * 2) / 3 from the first token; from position 0: (2 * 1 + 3 * 2) / 5
    return abs(_st_pools("weightedmean", (5.0, 1.0, 2.0), (0, 1, 1)) - 5.0 / 3.0) < 1e-6


def _mask_layout(mask: torch.Tensor) -> tuple[bool, bool]:
    """mask [B, L] -> (some row's tokens start after position 0, every row's tokens form one block or none),
    read back in one host sync."""
    m = (mask != 0).to(torch.int8)
    rises = (m[:, 1:] > m[:, :-1]).sum(1)
    late_start, one_block = torch.stack([(rises > 0).any(), (rises + m[:, 0] <= 1).all()]).tolist()
    return bool(late_start), bool(one_block)


_NORMALIZE_KEYS = ("module_input_name", "module_output_name")  # a Normalize's keys (6 on; before: fixed)


class FusedNormalize(Normalize):
    """``Normalize`` that normalizes a :class:`FusedPooling` output from its float32 pooled vectors (one
    rounding to the output dtype instead of two); any other input as sentence-transformers does."""

    def forward(self, features: dict) -> dict:
        x = features.get("sentence_embedding")
        names = tuple(getattr(self, n, "sentence_embedding") for n in _NORMALIZE_KEYS)
        if names == ("sentence_embedding", "sentence_embedding") and hasattr(x, _POOLED32):
            features["sentence_embedding"] = l2_normalize(getattr(x, _POOLED32)).to(x.dtype)
            return features
        return super().forward(features)


def _modules_of(model):
    if not isinstance(model, torch.nn.Sequential):
        raise TypeError(
            f"model must be a sentence_transformers.SentenceTransformer, got {type(model).__name__}"
        )
    return list(model._modules.items())


def _swap_to_plain(model) -> list[tuple[torch.nn.Module, type, dict]]:
    """Switch the fused modules back to their plain classes; returns what :func:`_swap_back` needs."""
    swapped = []
    for _, m in _modules_of(model):
        if isinstance(m, (FusedPooling, FusedNormalize)):
            extra = {k: m.__dict__.pop(k) for k in ("fuse_normalize",) if k in m.__dict__}
            swapped.append((m, type(m), extra))
            m.__class__ = Pooling if isinstance(m, FusedPooling) else Normalize
    return swapped


def _swap_back(swapped) -> None:
    for m, cls, extra in swapped:
        m.__class__ = cls
        m.__dict__.update(extra)


def save(self, *args, **kwargs):
    """``save`` of an accelerated model: writes the plain sentence-transformers modules (sentence-transformers
    6 loads a class from outside its package only with ``trust_remote_code``), then fuses them again."""
    swapped = _swap_to_plain(self)
    try:
        return type(self).save(self, *args, **kwargs)
    finally:
        _swap_back(swapped)


class _PlainSave:
    """An accelerated model's own ``save`` attribute: :func:`save` on the model. An object rather than a
    bound method because pickle stores a bound method by name, and unpickling resolved that name to the
    class's ``save`` (which writes the fused classes); deepcopy and pickle copy this with the model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return save(self.model, *args, **kwargs)


def _self_check_cases() -> list[tuple[str, dict]]:
    """Small float32 batches on the layouts where sentence-transformers versions pool differently: right and
    left padding, a prompt to exclude (after left padding too), a row with no token, a flattened batch."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 5, generator=g)
    right = (torch.arange(7)[None] < torch.tensor([[7], [4], [2]])).long()
    left = right.flip(1)
    empty = right.clone()
    empty[2] = 0
    cu = torch.tensor([0, 7, 11, 13], dtype=torch.int32)
    flat = torch.randn(1, 13, 5, generator=g)
    cases = [("right padding", {"token_embeddings": h, "attention_mask": right}),
             ("left padding", {"token_embeddings": h, "attention_mask": left}),
             ("a row with no token", {"token_embeddings": h, "attention_mask": empty}),
             ("a flattened batch", {"token_embeddings": flat, "cu_seq_lens_q": cu})]
    return cases + [(f"{name}, a 1-token prompt", dict(f, prompt_length=1)) for name, f in cases]


def _differs_from_st(m) -> str | None:
    """The first self-check case on which the fused forward of Pooling ``m`` differs from its own forward
    (its config: modes, include_prompt), or None. Run once per module by :func:`accelerate`, so that a
    sentence-transformers version whose pooling rules the head does not follow keeps its own Pooling."""
    cls = m.__class__
    try:
        for name, feats in _self_check_cases():
            def copy(f=feats):  # its forward may write into the features (5.1: the mask, max's states)
                return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in f.items()}

            with torch.no_grad():
                m.__class__ = cls
                want = m(copy())["sentence_embedding"].float()
                m.__class__ = FusedPooling
                got = m(copy())["sentence_embedding"].float()
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=0, equal_nan=True):
                return name
        return None
    finally:
        m.__class__ = cls


def accelerate(model):
    """Swap ``model``'s Pooling (and a Normalize right after it) for the fused head, in place.

    Returns the model. Raises TypeError for a non-sentence-transformers model, ValueError when it has
    no Pooling module. Calling it twice is harmless.
    """
    mods = _modules_of(model)
    found = False
    for i, (_, m) in enumerate(mods):
        if not isinstance(m, Pooling):
            continue
        found = True
        nxt = mods[i + 1][1] if i + 1 < len(mods) else None
        fuse = isinstance(nxt, Normalize) and all(
            getattr(nxt, n, "sentence_embedding") == "sentence_embedding" for n in _NORMALIZE_KEYS
        )
        if not isinstance(m, FusedPooling):
            differs = _differs_from_st(m)
            if differs is not None:
                _warn.warn(
                    f"accelerate: the fused head does not give this sentence-transformers' Pooling outputs "
                    f"({differs}); that Pooling is left as it is"
                )
                continue
        m.__class__ = FusedPooling
        m.fuse_normalize = bool(fuse)
        if fuse:
            nxt.__class__ = FusedNormalize
    if not found:
        raise ValueError("model has no sentence-transformers Pooling module to accelerate")
    # save_pretrained and the trainers' checkpoints call self.save: an attribute on the instance (copied
    # with it) writes the plain modules
    model.save = _PlainSave(model)
    return model


def restore(model):
    """Undo :func:`accelerate` (the original Pooling / Normalize classes). Returns the model."""
    _modules_of(model)  # TypeError naming model for anything else
    if isinstance(model.__dict__.get("save"), _PlainSave):
        del model.__dict__["save"]
    _swap_to_plain(model)
    return model
