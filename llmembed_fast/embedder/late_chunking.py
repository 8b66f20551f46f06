"""Late chunking: one forward pass over a long text, then one pooled embedding per chunk of it.

Each chunk's tokens have attended to the whole text (up to ``max_length`` tokens per window), so chunk
embeddings carry document context. Chunks are character spans of the text; the tokens overlapping a span
(by the tokenizer's offsets) are pooled with :func:`llmembed_fast.pool_segments`. A text longer than
``max_length`` tokens is run as consecutive windows of ``max_length`` tokens (context does not cross
windows; a chunk across a window boundary still pools all its tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from llmembed_fast.embedder import batching
from llmembed_fast.embedder.args import check_output_args, check_positive, check_text, resolve_pooling
from llmembed_fast.embedder.prompts import render
from llmembed_fast.embedder.tokenize import _text_token_ranges
from llmembed_fast.ops.pooling import pool_segments


def chunk_spans(text: str, chunks) -> list[tuple[int, int]]:
    """Character spans from ``chunks``: (start, end) pairs, substrings found in order (each searched from
    the end of the previous one), or a callable ``text -> either``."""
    if callable(chunks):
        chunks = chunks(text)
    if isinstance(chunks, (np.ndarray, torch.Tensor)):  # an [S, 2] array of spans
        chunks = chunks.tolist()
    if isinstance(chunks, str) or not isinstance(chunks, Sequence) or not len(chunks):
        raise TypeError(
            "chunks must be a non-empty list of (start, end) spans or of substrings, or a callable "
            "returning one"
        )
    spans, pos = [], 0
    for i, c in enumerate(chunks):
        if isinstance(c, str):
            p = text.find(c, pos)
            if p < 0:
                raise ValueError(f"chunks[{i}] = {c[:40]!r} not found in the text after position {pos}")
            spans.append((p, p + len(c)))
            pos = p + len(c)
        else:
            try:
                a, b = c
            except (TypeError, ValueError) as exc:
                raise TypeError(f"chunks[{i}] must be a (start, end) pair or a string, got {c!r}") from exc
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (a, b)):
                raise TypeError(f"chunks[{i}] must hold integer character offsets, got {c!r}")
            a, b = int(a), int(b)
            if not 0 <= a <= b <= len(text):
                raise ValueError(
                    f"chunks[{i}] = {(a, b)} must satisfy 0 <= start <= end <= len(text) = {len(text)}"
                )
            spans.append((a, b))
    return spans


def encode_late_chunks(
    embedder,
    text: str,
    chunks: Sequence | Callable,
    *,
    instruction: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    pooling: str = "mean",
    normalize: bool | None = None,
    dims: int | None = None,
    precision: str = "float32",
    output: str = "numpy",
    max_tokens_per_batch: int | None = None,
    ranges=None,
    calibration_embeddings=None,
):
    """Embeddings [S, D] of the S chunks of ``text`` after one forward over all of it (see module doc).

    ``instruction`` / ``prompt`` / ``prompt_name`` select the prompt as in ``encode`` (none of them: the
    embedder's ``default_prompt_name`` prompt, if any). ``pooling`` defaults to "mean" over each chunk's
    tokens; ``normalize``/``dims`` default to the embedder's (its ``truncate_dim`` applies last, as in
    ``encode``). ``precision``, ``output``, ``dims`` and
    ``max_tokens_per_batch`` are checked as ``encode`` checks them.
    ``ranges``/``calibration_embeddings``: for int8/uint8 only, as in ``encode`` (pass them: ranges calibrated
    on one document's few chunks make codes that cannot be compared with other documents').
    """
    check_text(text, "text")
    check_output_args(precision, output, ranges, calibration_embeddings)
    max_tokens_per_batch = check_positive(max_tokens_per_batch, "max_tokens_per_batch")
    dims = embedder.dims if dims is None else check_positive(dims, "dims")
    normalize = embedder.resolve_normalize(normalize)
    mode = resolve_pooling(pooling)
    prompt = embedder.resolve_prompt(instruction, prompt, prompt_name)
    if not embedder.info.fast:
        raise ValueError("late chunking needs a fast tokenizer (offset mappings)")
    spans = chunk_spans(text, chunks)
    src = text
    if embedder.lowercase:  # lower-casing can change lengths ('İ' -> 'i̇'): move the spans with it
        src = text.lower()
        pos = [0]
        for c in text:
            pos.append(pos[-1] + len(c.lower()))
        if pos[-1] == len(src):
            spans = [(pos[a], pos[b]) for a, b in spans]
    rendered, copies = render(embedder.template_for(instruction, prompt), src)
    base = copies[embedder.style.pool_copy][0]
    enc = embedder.tokenizer(
        rendered,
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        verbose=False,
    )
    ids = list(enc["input_ids"])
    suffix = list(embedder.info.eos_suffix) if getattr(embedder, "strip_eos", False) else []
    if suffix and ids[-len(suffix) :] == suffix:
        ids = ids[: len(ids) - len(suffix)]
    token_spans = _text_token_ranges(
        enc["offset_mapping"], enc["special_tokens_mask"], [(base + a, base + b) for a, b in spans]
    )
    if embedder.add_eos and not embedder.info.adds_eos and embedder.info.eos_id is not None:
        ids.append(embedder.info.eos_id)
    W = embedder.max_length or len(ids)
    windows = [ids[i : i + W] for i in range(0, max(len(ids), 1), W)]
    plan = batching.plan_batches(
        [len(w) for w in windows], max_tokens=max_tokens_per_batch or embedder._default_max_tokens()
    )
    switch = getattr(embedder, "_rope_switch", None)
    if switch is not None:  # see LLMEmbedder.encode_float
        plan = batching.isolate_longer(plan, [len(w) for w in windows], switch)
    dev = embedder.device
    parts: list[torch.Tensor | None] = [None] * len(windows)
    was_training = embedder.model.training
    embedder.model.eval()
    try:
        with torch.inference_mode():
            for idx in plan:
                b = batching.pad_batch(
                    [windows[i] for i in idx],
                    [0] * len(idx),
                    pad_id=embedder.info.pad_id,
                    padding_side="right",
                    device=dev,
                )
                h = embedder.hidden_states(b)
                for j, i in enumerate(idx):
                    parts[i] = h[j, : len(windows[i])]
            hidden = torch.cat(parts, 0)
            starts = torch.tensor([a for a, _ in token_spans], dtype=torch.int64)
            ends = torch.tensor([b for _, b in token_spans], dtype=torch.int64)
            emb = pool_segments(
                hidden,
                starts.to(dev),
                ends.to(dev),
                mode,
                dims=dims,
                normalize=normalize,
            )
    finally:
        embedder.model.train(was_training)
    emb = emb.clone()  # a normal tensor, as encode gives (inference tensors refuse autograd, in-place use)
    truncate = getattr(embedder, "truncate_dim", None)
    if truncate is not None:  # the embedder's sentence-transformers-style truncation, as encode applies it
        from llmembed_fast.embedder.st_names import check_truncate_dim

        emb = emb[:, : check_truncate_dim(truncate, emb.shape[1], "the embedder's truncate_dim")]
    return embedder._finish(emb, precision, output, False, ranges, calibration_embeddings)


__all__ = ["encode_late_chunks", "chunk_spans"]
