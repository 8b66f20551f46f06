"""Gradient caching (GradCache, Gao et al. 2021): contrastive batches far larger than fit in memory.

One step, for a query batch of B rows and a document batch of N rows, split into chunks of ``chunk_size``:

1. embed every chunk without a graph (``torch.no_grad``), recording the RNG state before each chunk;
2. run ``loss_fn`` once on the detached embeddings [B, D], [N, D] and take the gradient of the loss with
   respect to them (the fused ``lf.contrastive_loss`` does this in O((B+N)*D) memory, every Matryoshka
   dim in the same pass);
3. re-run each chunk with a graph under its recorded RNG state (same dropout masks) and back-propagate
   that chunk's rows of the cached gradient into the parameters; then free the chunk's activations.

Peak memory is one chunk's activations plus the O((B+N)*D) embeddings, their gradients and the loss's
own buffers. The parameter gradients equal those of one forward/backward over the whole batch (with the
same random numbers). Each chunk but the step's last is embedded twice (the last one keeps its graph from
step 1, ``reuse_last_chunk``): about one extra forward pass of compute in total.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from llmembed_fast.training.chunking import (
    batch_size,
    chunk_ranges,
    chunk_widths,
    longest_first,
    row_stats,
    slice_batch,
    take_rows,
    token_ranges,
)
from llmembed_fast.training.rng import RngState, cuda_devices_of, preserved_rng

_AUTOCAST_DEVICES = ("cuda", "cpu")


class _Tower(NamedTuple):
    """One side of the batch after the first pass: what the replay needs."""

    name: str
    encoder: Callable
    batch: object
    ranges: list[tuple[int, int]]
    states: list[RngState] | None
    devices: list[int]
    widths: list[int | None]  # each chunk's trimmed width (None: all columns)
    sync: object = None  # the module whose no_sync() governs this tower's gradient synchronization
    side: int = 0       # 0: rows of q, 1: rows of d
    offset: int = 0     # first row in q or d
    kept: torch.Tensor | None = None  # the last chunk's embeddings with their graph (reuse_last_chunk)
    order: torch.Tensor | None = None  # sort_by_length: row i of ``batch`` is row order[i] of the input


class _Plan(NamedTuple):
    """How one side's batch is cut into chunks: ``batch`` with its rows in chunk order, ``order`` (row i of
    ``batch`` is row order[i] of the input; None: the input order), the chunks' row ranges, their trimmed
    widths."""

    batch: object
    n: int
    order: torch.Tensor | None
    ranges: list[tuple[int, int]]
    widths: list[int | None]


def _grad_rows(g: torch.Tensor, t: _Tower, lo: int, hi: int) -> torch.Tensor:
    """The rows of the cached gradient g (all of q or d) that belong to chunk [lo, hi) of tower t."""
    if t.order is None:
        return g[t.offset + lo:t.offset + hi]
    return g.index_select(0, t.order[lo:hi] + t.offset)


def _check_chunk_size(value, name: str, what: str = "rows per chunk") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers too
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int ({what}), got {value}")
    return int(value)


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """(device_type, dtype) of every autocast context active in this thread."""
    out = []
    for dev in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(dev):
            out.append((dev, torch.get_autocast_dtype(dev)))
    return out


@contextlib.contextmanager
def _autocast(state: list[tuple[str, torch.dtype]], enabled: bool = True):
    """Re-enter the autocast contexts of ``state`` (``enabled=False``: turn them off)."""
    with contextlib.ExitStack() as stack:
        for dev, dtype in state:
            stack.enter_context(torch.autocast(device_type=dev, dtype=dtype, enabled=enabled))
        yield


def synced_module(module):
    """``module`` when it synchronizes gradients across ranks and can be told not to: a ``no_sync()`` context
    (DistributedDataParallel, FSDP) or ``set_requires_gradient_sync()`` (FSDP2's ``fully_shard``), else
    None."""
    hooks = (getattr(module, "no_sync", None), getattr(module, "set_requires_gradient_sync", None))
    return module if any(callable(h) for h in hooks) else None


def _fsdp2_sync_flags(module) -> list | None:
    """FSDP2: each parameter group's (group, reduce_grads, all_reduce_grads) under ``module``, to restore what
    ``set_requires_gradient_sync(False)`` changes; None where this torch keeps them elsewhere."""
    def groups(state):
        if hasattr(state, "_fsdp_param_groups"):  # newer torch: a list per state
            return list(state._fsdp_param_groups)
        group = state._fsdp_param_group  # older: at most one (None); AttributeError where neither exists
        return [] if group is None else [group]

    try:
        found = [g for m in module.modules() if callable(getattr(m, "_get_fsdp_state", None))
                 for g in groups(m._get_fsdp_state())]
        return [(g, g.reduce_grads, g.all_reduce_grads) for g in found]
    except AttributeError:
        return None


@contextlib.contextmanager
def no_sync(module):
    """``module.no_sync()`` (DDP, FSDP), or for an FSDP2 module gradient synchronization turned off and
    restored afterwards (to each parameter group's previous setting where torch exposes it, else on)."""
    if callable(getattr(module, "no_sync", None)):
        with module.no_sync():
            yield
        return
    before = _fsdp2_sync_flags(module)
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if before is None:
            module.set_requires_gradient_sync(True)
        else:
            for g, reduce, all_reduce in before:
                g.reduce_grads, g.all_reduce_grads = reduce, all_reduce


def _grad_tensor(batch, prefix: str = "") -> str | None:
    """The key path of a tensor in ``batch`` that requires grad ("" for the batch itself), or None."""
    if isinstance(batch, torch.Tensor):
        return prefix if batch.requires_grad else None
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            found = _grad_tensor(v, f"{prefix}[{k!r}]")
            if found is not None:
                return found
    return None


def _frozen_module(encoder) -> bool:
    """True for an ``nn.Module`` with parameters, none of them trainable: nothing of its chunks to
    back-propagate, so they are not re-run. (Any other callable is re-run chunk by chunk: which of its chunks
    carry a graph is known only by running them.)"""
    if not isinstance(encoder, torch.nn.Module):
        return False
    has_params = False
    for p in encoder.parameters():
        if p.requires_grad:
            return False
        has_params = True
    return has_params


def _graph_leaves(t: torch.Tensor, skip: tuple = ()) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``t`` was computed from (e.g. a loss's learnable temperature),
    other than those in ``skip``."""
    skip_ids = {id(x) for x in skip}
    out, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if var is not None:
            if id(var) not in skip_ids:
                out.append(var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


def _ddp_owned_leaves(loss: torch.Tensor, skip: tuple, towers) -> dict[int, list[torch.Tensor]]:
    """{id(sync module): the loss's leaves that are its parameters}, for each tower's module that is a
    ``DistributedDataParallel`` with ``find_unused_parameters=False``. Such a module expects every parameter's
    gradient hook in its synchronized backward; a leaf of the loss (a learnable temperature registered on the
    model) gets its gradient from the loss's backward instead, outside it, so the replay adds it to the
    synchronized backward with a zero gradient (its accumulated one is then all-reduced with the rest)."""
    from torch.nn.parallel import DistributedDataParallel

    syncs = {id(t.sync): t.sync for t in towers
             if isinstance(t.sync, DistributedDataParallel) and not t.sync.find_unused_parameters}
    if not syncs or loss.grad_fn is None:
        return {}
    leaves = _graph_leaves(loss, skip)
    if not leaves:
        return {}
    out = {}
    for key, sync in syncs.items():
        params = {id(p) for p in sync.parameters()}
        owned = [x for x in leaves if id(x) in params]
        if owned:
            out[key] = owned
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class GradCache:
    """Gradient-cached contrastive training step for any encoder and any embedding loss.

    Parameter gradients equal one uncached forward/backward's. A re-run chunk's forward side effects happen
    twice (BatchNorm running statistics, say), as in sentence-transformers' cached losses.

    Args:
        encoder: callable mapping a chunk of the query batch (a tensor, or a dict of tensors sliced along
            dim 0, nested dicts included) to embeddings [b, D] (float). A ``DistributedDataParallel``, FSDP or
            FSDP2 (``fully_shard``) module is synchronized once per step: every chunk's backward but its last
            runs under ``no_sync()`` (FSDP2: ``set_requires_gradient_sync(False)``). Under FSDP / FSDP2 that
            keeps unsharded gradients until the step's last backward, as their own ``no_sync`` does.
        loss_fn: ``loss_fn(q [B, D], d [N, D], **loss_kwargs) -> scalar tensor``, e.g.
            ``lf.contrastive_loss`` (with ``group=`` for cross-device negatives).
        chunk_size: rows per chunk (the memory knob); the last chunk holds the remainder.
        doc_encoder: a separate encoder for the documents (default: ``encoder``, one shared tower).
        scaler: a ``torch.amp.GradScaler``: :meth:`step` scales the loss before taking the embeddings'
            gradients, so the parameter gradients come out scaled as ``scaler.step`` expects.
        doc_chunk_size: rows per document chunk (default ``chunk_size``).
        trim_padding: drop each chunk's all-padding trailing columns (dict batches with an
            ``attention_mask``), so short chunks of a long-padded batch run at their own width. Only the
            sequence tensors are cut: the top-level keys in ``chunking.SEQUENCE_KEYS`` (``input_ids``,
            ``attention_mask``, ``token_type_ids``, ``position_ids``, ``pool_mask``, ...) and
            ``sequence_keys``.
        sequence_keys: more top-level keys whose dim 1 is the token axis (trimmed with ``trim_padding``).
        sort_by_length: with ``trim_padding``, chunk each tower's rows longest first (by their last attended
            column), so every chunk is padded to about its own rows' length instead of nearly the batch's
            longest: with mixed lengths, far fewer padded tokens run through the encoder (twice). The loss
            still sees the rows in the caller's order, and the gradients are unchanged. Rows are reordered
            only where that changes something (right-padded batches of mixed lengths, more than one chunk).
            Default True.
        chunk_tokens: also cap each chunk at this many attended (non-padding) tokens: consecutive rows (of
            the sorted order with ``sort_by_length``) are packed while they fit, a longer row runs alone; the
            row cap ``chunk_size`` still holds. With sorting, short rows then share large chunks and long rows
            small ones, at about the same memory (sentence-transformers' ``mini_batch_num_tokens``). Needs
            dict batches with an ``attention_mask`` (or flattened ones). Under FSDP / FSDP2 every rank must
            end up with as many chunks (checked). Default None: rows only.
        grad_multiplier: multiplies every gradient of the step (the gradient reaching the loss: the
            embeddings' and the loss's own parameters', e.g. a learnable temperature), not the returned
            loss. With DDP and a loss that is already the global one (``contrastive_loss(group=...)``),
            DDP's averaging over ranks divides the gradient by the world size; ``grad_multiplier=world_size``
            undoes it.
        sync_module: the module whose ``no_sync()`` governs gradient synchronization (a
            ``DistributedDataParallel`` / FSDP / FSDP2 module), when the encoders are functions calling it (a
            bound method, a lambda): every chunk's backward but the step's last runs under its
            ``no_sync()``. Default: each encoder itself when it has ``no_sync()``.
        replay_rng: restore the RNG state of each chunk's first pass before its re-run (default True).
        reuse_last_chunk: embed the step's last chunk (the last document chunk) with a graph in the first
            pass and back-propagate it first in the second, instead of running it twice: one chunk's forward
            less per step (with B = N = 2 chunks each: 7 chunk forwards instead of 8). Its activations are
            alive while the loss runs, when no other chunk's are, so the peak stays one chunk's activations
            (plus the loss's buffers). Not applied under a ``sync_module`` (or an encoder with ``no_sync()``:
            DDP, FSDP, FSDP2), whose gradient synchronization is decided at forward time. With
            ``sort_by_length`` the kept chunk is the last tower's longest (it runs last in the first pass), so
            the forward saved is the largest. Default True.

    Use :meth:`step` in a plain loop (backward done, returns the detached loss), or :meth:`forward` when a
    framework calls ``loss.backward()`` itself (the chunks are re-run inside that backward).
    """

    def __init__(self, encoder: Callable, loss_fn: Callable, chunk_size: int, *,
                 doc_encoder: Callable | None = None, scaler=None, doc_chunk_size: int | None = None,
                 trim_padding: bool = True, sequence_keys=(), sort_by_length: bool = True,
                 chunk_tokens: int | None = None,
                 grad_multiplier: float = 1.0, replay_rng: bool = True, reuse_last_chunk: bool = True,
                 sync_module=None):
        if not callable(encoder):
            raise TypeError("encoder must be callable (chunk -> [b, D] embeddings), "
                            f"got {type(encoder).__name__}")
        if doc_encoder is not None and not callable(doc_encoder):
            raise TypeError("doc_encoder must be callable or None, "
                            f"got {type(doc_encoder).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable (q, d, **kwargs) -> scalar, "
                            f"got {type(loss_fn).__name__}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if isinstance(grad_multiplier, bool) or not isinstance(grad_multiplier, numbers.Real):
            raise TypeError(f"grad_multiplier must be a number, got {type(grad_multiplier).__name__}")
        if not math.isfinite(grad_multiplier):
            raise ValueError(f"grad_multiplier must be finite, got {grad_multiplier}")
        if sync_module is not None and synced_module(sync_module) is None:
            raise TypeError("sync_module must have a no_sync() method (DistributedDataParallel, FSDP) or "
                            "set_requires_gradient_sync() (FSDP2), or be None, "
                            f"got {type(sync_module).__name__}")
        if isinstance(sequence_keys, str):
            sequence_keys = (sequence_keys,)
        sequence_keys = tuple(sequence_keys)
        if not all(isinstance(k, str) for k in sequence_keys):
            raise TypeError(f"sequence_keys must be strings, got {sequence_keys!r}")
        self.encoder = encoder
        self.doc_encoder = doc_encoder
        self.loss_fn = loss_fn
        self.chunk_size = _check_chunk_size(chunk_size, "chunk_size")
        self.doc_chunk_size = self.chunk_size if doc_chunk_size is None else _check_chunk_size(doc_chunk_size,
                                                                                               "doc_chunk_size")
        self.scaler = scaler
        self.trim_padding = bool(trim_padding)
        self.sort_by_length = bool(sort_by_length)
        self.chunk_tokens = None if chunk_tokens is None else _check_chunk_size(chunk_tokens, "chunk_tokens",
                                                                                  "tokens per chunk")
        self.grad_multiplier = float(grad_multiplier)
        self.replay_rng = bool(replay_rng)
        self.reuse_last_chunk = bool(reuse_last_chunk)
        self.sync_module = sync_module
        self.sequence_keys = sequence_keys

    def _sync_of(self, encoder):
        """The module whose ``no_sync()`` governs ``encoder``'s synchronization, or None."""
        if self.sync_module is not None:
            return self.sync_module
        return synced_module(encoder)

    # ------------------------------------------------------------------------------------------------
    # pass 1: embeddings without a graph
    # ------------------------------------------------------------------------------------------------

    def _plan(self, batch, chunk: int, name: str) -> _Plan:
        """The chunks of ``batch``: at most ``chunk`` rows (and ``chunk_tokens`` tokens) each, of the rows
        sorted longest first (``sort_by_length``), with their trimmed widths. One host transfer for every
        row's length and token count; pass 2 reuses the plan."""
        n = batch_size(batch, name)
        if n == 0:
            raise ValueError(f"{name} is empty (0 rows)")
        ends, counts = row_stats(batch) if self.trim_padding or self.chunk_tokens else (None, None)
        if self.chunk_tokens is not None and counts is None:
            raise ValueError(f"chunk_tokens needs each row's token count: {name} must be a dict batch with a "
                             "2-D attention_mask (or a flattened one with cu_seq_lens_q); or use chunk_size "
                             "alone")
        ends = ends if self.trim_padding else None
        order = None
        if ends is not None and self.sort_by_length and (n > chunk or self.chunk_tokens is not None):
            perm = longest_first(ends)
            if perm is not None:
                order = torch.tensor(perm, dtype=torch.int64)
                batch = take_rows(batch, order)
                ends = [ends[i] for i in perm]
                counts = [counts[i] for i in perm]
        ranges = (chunk_ranges(n, chunk) if self.chunk_tokens is None
                  else token_ranges(counts, self.chunk_tokens, chunk))
        widths = chunk_widths(batch, ranges, ends) if ends is not None else [None] * len(ranges)
        return _Plan(batch, n, order, ranges, widths)

    def _embed_no_grad(self, encoder, plan: _Plan, name: str, capture: bool, side: int = 0,
                       offset: int = 0, keep_last: bool = False) -> tuple[torch.Tensor, _Tower]:
        """Embeddings [n, D] of a planned batch chunk by chunk without a graph (``keep_last``: the last chunk
        with one, kept in the tower for the second pass), and what the second pass needs."""
        batch, n, order, ranges, widths = plan
        states: list[RngState] | None = [] if capture else None
        devices: list[int] = []
        out = kept = None
        with torch.no_grad():
            for i, (lo, hi) in enumerate(ranges):
                part = slice_batch(batch, lo, hi, trim_padding=self.trim_padding, width=widths[i],
                                   sequence_keys=self.sequence_keys)
                if i == 0:
                    devices = cuda_devices_of(part)
                if capture:
                    states.append(RngState(devices))
                keep = keep_last and i == len(ranges) - 1
                with torch.enable_grad() if keep else contextlib.nullcontext():
                    emb = self._check_embeddings(encoder(part), hi - lo, name)
                if keep and emb.requires_grad:
                    kept = emb
                if out is None:
                    out = torch.empty((n, emb.shape[1]), dtype=emb.dtype, device=emb.device)
                    order = None if order is None else order.to(out.device)
                elif emb.shape[1] != out.shape[1] or emb.dtype != out.dtype:
                    raise ValueError(f"the encoder returned [{hi - lo}, {emb.shape[1]}] {emb.dtype} "
                                     f"for a chunk of {name} but [.., {out.shape[1]}] {out.dtype} "
                                     "for the previous ones")
                if order is None:
                    out[lo:hi] = emb
                else:  # back in the caller's row order
                    out.index_copy_(0, order[lo:hi], emb)
        return out, _Tower(name, encoder, batch, ranges, states, devices, widths, self._sync_of(encoder),
                           side, offset, kept, order)

    @staticmethod
    def _check_embeddings(emb, rows: int, name: str) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"the encoder must return a tensor of embeddings [b, D] for a chunk of {name}, "
                            f"got {type(emb).__name__}")
        if emb.dim() != 2 or emb.shape[0] != rows:
            raise ValueError(f"the encoder must return embeddings of shape [b, D] = [{rows}, D] "
                             f"for a chunk of {rows} rows of {name}, got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"the encoder must return floating-point embeddings, got {emb.dtype}")
        return emb

    def _first_pass(self, query_batch, doc_batch, capture: bool, keep: bool = False):
        """(q [B, D], d [N, D], towers); ``keep``: the last document chunk keeps its graph (when
        ``reuse_last_chunk`` and no module's ``no_sync`` governs its encoder)."""
        columns = list(doc_batch) if isinstance(doc_batch, (list, tuple)) else [doc_batch]
        if not columns:
            raise ValueError("doc_batch must not be an empty list")
        names = ["doc_batch"] if len(columns) == 1 else [f"doc_batch[{i}]" for i in range(len(columns))]
        nq = batch_size(query_batch, "query_batch")
        sizes = [batch_size(c, n) for c, n in zip(columns, names, strict=True)]
        for batch, name in ((query_batch, "query_batch"), *zip(columns, names, strict=True)):
            key = _grad_tensor(batch)
            if key is not None:
                raise ValueError(
                    f"{name}{key} requires grad: GradCache re-runs each chunk and back-propagates into the "
                    "encoder only, not into what produced its inputs; detach it, or move the module that "
                    "made it into the encoder")
        for size, name in ((nq, "query_batch"), *zip(sizes, names, strict=True)):
            if size == 0:
                raise ValueError(f"{name} is empty (0 rows)")
        if sum(sizes) < nq:
            raise ValueError(f"doc_batch has {sum(sizes)} rows but query_batch has {nq}: "
                             "the documents must hold every query's positive (N >= B)")
        doc_encoder = self.doc_encoder or self.encoder
        q_plan = self._plan(query_batch, self.chunk_size, "query_batch")
        d_plans = [self._plan(c, self.doc_chunk_size, n) for c, n in zip(columns, names, strict=True)]
        self._check_chunk_counts(
            len(q_plan.ranges),
            sum(len(p.ranges) for p in d_plans),
            {id(m): m for m in (self._sync_of(self.encoder), self._sync_of(doc_encoder)) if m is not None},
        )
        q, tq = self._embed_no_grad(self.encoder, q_plan, "query_batch", capture)
        towers, parts, offset = [tq], [], 0
        keep = keep and self.reuse_last_chunk and self._sync_of(doc_encoder) is None
        last = d_plans[-1]
        if keep and last.order is not None and len(last.ranges) > 1:
            # the kept chunk is the one not re-run: the longest (sorted first) runs last, so that is the
            # forward saved (its activations are the largest either way, alive while the loss runs)
            d_plans[-1] = last._replace(ranges=last.ranges[1:] + last.ranges[:1],
                                        widths=last.widths[1:] + last.widths[:1])
        for c, (plan, name) in enumerate(zip(d_plans, names, strict=True)):
            d, td = self._embed_no_grad(doc_encoder, plan, name, capture, side=1,
                                        offset=offset, keep_last=keep and c == len(columns) - 1)
            offset += d.shape[0]
            parts.append(d)
            towers.append(td)
        if len({(p.shape[1], p.dtype) for p in parts + [q]}) != 1:
            raise ValueError("the query and document embeddings differ in width or dtype: "
                             + ", ".join(f"{t.name} {tuple(p.shape)} {p.dtype}"
                                         for t, p in zip(towers, [q] + parts, strict=True)))
        d = parts[0] if len(parts) == 1 else torch.cat(parts)
        return q, d, towers

    @staticmethod
    def _check_chunk_counts(n_query: int, n_doc: int, syncs: dict) -> None:
        """FSDP and FSDP2 gather parameters in every forward: every rank must run as many chunks, or the ranks
        wait on each other for good. A ValueError on every rank instead (DDP synchronizes only in backward,
        once per step, and needs no such check). FSDP2 modules name no process group: the default one."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from llmembed_fast.distributed import _collective_device

        if not (dist.is_available() and dist.is_initialized()):
            return
        for sync in syncs.values():
            if isinstance(sync, DistributedDataParallel):
                continue
            group = getattr(sync, "process_group", None)
            mine = torch.tensor([n_query, n_doc], dtype=torch.int64,
                                device=_collective_device(torch.device("cpu"), group))
            bufs = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(bufs, mine, group=group)
            counts = [tuple(b.tolist()) for b in bufs]
            if len(set(counts)) > 1:
                raise ValueError(
                    f"{type(sync).__name__} runs a collective in every forward, so every rank must embed as "
                    f"many chunks; (query chunks, document chunks) per rank: {counts}. Give the ranks equal "
                    "batch sizes (or chunk sizes that give equal counts)")

    def _call_loss(self, q, d, loss_kwargs) -> torch.Tensor:
        with torch.enable_grad():
            loss = self.loss_fn(q, d, **loss_kwargs)
            loss = loss.reshape(()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else loss
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor, got "
                             + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                                else type(loss).__name__))
        if not loss.requires_grad:
            raise ValueError("loss_fn's result does not depend on the embeddings "
                             "(no gradient flows to q or d)")
        return loss

    # ------------------------------------------------------------------------------------------------
    # pass 2: re-run each chunk with a graph and back-propagate its cached gradient
    # ------------------------------------------------------------------------------------------------

    def _replay(self, towers, grads, sync_leaves: dict | None = None) -> None:
        """Pass 2: re-run every chunk with a graph and back-propagate its rows of ``grads`` (q's, d's).

        Under a sync module (DDP, FSDP) every chunk's backward runs under ``no_sync`` but one, the module's
        last, which must carry a graph (a chunk without one runs no backward, and the ranks' gradients would
        never be reduced). So each tower's chunks but its last run first; then the towers' last chunks,
        grouped by sync module in an order every rank shares, within a module those of towers whose chunks
        came back without a graph first. If the synchronized chunk still has no
        graph (all of that module's re-run chunks were graphless but an earlier one), the latest chunk that
        had one runs again, synchronized, with a zero gradient. ``sync_leaves``: see ``_ddp_owned_leaves``.
        """
        # a chunk that kept its graph from the first pass goes first (its activations are freed at once)
        for t in towers:
            g = grads[t.side]
            if t.kept is not None and g is not None:
                lo, hi = t.ranges[-1]
                torch.autograd.backward(t.kept, _grad_rows(g, t, lo, hi).to(t.kept.dtype))
        live = [t for t in towers if grads[t.side] is not None and not _frozen_module(t.encoder)]
        todo = {id(t): list(range(len(t.ranges) - (t.kept is not None))) for t in live}  # kept: the last
        sync_leaves = sync_leaves or {}
        had_graph, graphless = set(), set()  # id(tower) of towers with a re-run chunk with / without a graph
        with_graph: dict[int, tuple] = {}  # id(sync module) -> (tower, chunk): its latest chunk with a graph
        devices = sorted({d for t in towers for d in t.devices})

        def run(t, i, synced: bool, zero: bool = False) -> bool:
            lo, hi = t.ranges[i]
            part = slice_batch(t.batch, lo, hi, trim_padding=self.trim_padding, width=t.widths[i],
                               sequence_keys=self.sequence_keys)
            ctx = no_sync(t.sync) if t.sync is not None and not synced else contextlib.nullcontext()
            with ctx:
                if t.states is not None:
                    t.states[i].restore()
                emb = self._check_embeddings(t.encoder(part), hi - lo, t.name)
                if not emb.requires_grad:  # a frozen route: nothing to back-propagate into
                    return False
                g = _grad_rows(grads[t.side], t, lo, hi).to(emb.dtype)
                roots, grad_roots = [emb], [torch.zeros_like(g) if zero else g]
                if synced:
                    leaves = sync_leaves.get(id(t.sync), [])
                    roots += leaves
                    grad_roots += [torch.zeros_like(x) for x in leaves]
                torch.autograd.backward(roots, grad_roots)
            had_graph.add(id(t))
            if t.sync is not None:
                with_graph[id(t.sync)] = (t, i)
            return True

        with preserved_rng(devices), torch.enable_grad():
            for t in live:
                for i in todo[id(t)][:-1]:
                    if not run(t, i, synced=False):
                        graphless.add(id(t))
            # the towers' last chunks: those of no sync module first (no collective), then each sync
            # module's together, the modules in the order of their first tower, the same on every rank
            # (collectives pair up across ranks by the order they are issued in: two DDP towers reduced in a
            # rank-dependent order mixed their gradients); within a module, towers seen only without a graph
            # first, unknown ones next, then those seen with one; a module's last job is the synced one
            module_order: dict[int, int] = {}
            for t in towers:
                if t.sync is not None:
                    module_order.setdefault(id(t.sync), len(module_order))

            def rank(ti):
                key = id(ti[0])
                graph = 2 if key in had_graph else (0 if key in graphless else 1)
                return (-1 if ti[0].sync is None else module_order[id(ti[0].sync)], graph)

            finals = sorted(((t, todo[id(t)][-1]) for t in live if todo[id(t)]), key=rank)
            last_of = {id(t.sync): j for j, (t, _) in enumerate(finals) if t.sync is not None}
            for j, (t, i) in enumerate(finals):
                synced = t.sync is not None and last_of[id(t.sync)] == j
                if run(t, i, synced) or not synced:
                    continue
                earlier = with_graph.get(id(t.sync))
                if earlier is not None:  # reduce what the module's earlier chunks accumulated
                    run(*earlier, synced=True, zero=True)

    # ------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------

    def step(self, query_batch, doc_batch, **loss_kwargs) -> torch.Tensor:
        """One gradient-cached forward/backward; gradients are accumulated into the parameters' ``.grad``.

        Args:
            query_batch: a tensor or dict of tensors with B rows along dim 0.
            doc_batch: the same with N >= B rows (positives, then any hard negatives, as ``loss_fn`` expects),
                or a list of such batches (e.g. a positives column and hard-negative columns, each padded to
                its own length), embedded separately and concatenated along dim 0.
            **loss_kwargs: passed to ``loss_fn`` (e.g. ``labels=``, ``temperature=``, ``group=``).

        Returns:
            The loss, a detached 0-d tensor (unscaled). The caller steps the optimizer (or the scaler).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("GradCache.step computes gradients: call it outside torch.inference_mode()")
        with torch.enable_grad():  # a training step: under a caller's no_grad() too
            q, d, towers = self._first_pass(query_batch, doc_batch, capture=self.replay_rng, keep=True)
            q.requires_grad_(True)
            d.requires_grad_(True)
            loss = self._call_loss(q, d, loss_kwargs)
            target = loss * self.grad_multiplier if self.grad_multiplier != 1.0 else loss
            if self.scaler is not None:
                target = self.scaler.scale(target)
            sync_leaves = _ddp_owned_leaves(target, (q, d), towers)
            # a full backward: the loss's own leaves (a learnable temperature) get their .grad too; outside
            # autocast, as forward()'s loss.backward() runs in a training loop
            with _autocast(_autocast_state(), enabled=False):
                target.backward()
            gq, gd = q.grad, d.grad
            del q, d, target
            self._replay(towers, (gq, gd), sync_leaves)
        return loss.detach()

    def forward(self, query_batch, doc_batch, **loss_kwargs) -> torch.Tensor:
        """The loss as a tensor whose ``backward()`` runs pass 2 (re-embedding) inside the backward.

        For frameworks that call ``loss.backward()`` / ``scaler.scale(loss).backward()`` /
        ``accelerator.backward(loss)`` themselves: whatever gradient reaches the loss (GradScaler's scale,
        1 / gradient-accumulation steps) scales the parameter gradients. The autocast state active here is
        re-entered for the re-run. Without grad mode (evaluation) it only computes the loss.
        """
        capture = torch.is_grad_enabled()
        q, d, towers = self._first_pass(query_batch, doc_batch, capture=capture and self.replay_rng,
                                        keep=capture)
        if not capture:
            return self.loss_fn(q, d, **loss_kwargs)
        anchor = torch.empty(0, device=q.device, requires_grad=True)
        sync_leaves: dict = {}  # filled once the loss exists, read by the replay inside its backward
        qg, dg = _ReplayBridge.apply(anchor, q, d, (self, towers, _autocast_state(), sync_leaves))
        loss = self._call_loss(qg, dg, loss_kwargs)
        sync_leaves.update(_ddp_owned_leaves(loss, (anchor,), towers))
        # every gradient reaching the loss (the embeddings', the loss's own parameters') gets the multiplier
        return _ScaleGrad.apply(loss, self.grad_multiplier) if self.grad_multiplier != 1.0 else loss

    __call__ = forward

    def embed(self, batch, *, doc: bool = False) -> torch.Tensor:
        """Embeddings [n, D] of ``batch`` in chunks, without a graph (evaluation)."""
        encoder = (self.doc_encoder or self.encoder) if doc else self.encoder
        name = "doc_batch" if doc else "batch"
        plan = self._plan(batch, self.doc_chunk_size if doc else self.chunk_size, name)
        emb, _ = self._embed_no_grad(encoder, plan, name, capture=False)
        return emb


class _ReplayBridge(torch.autograd.Function):
    """Identity on the detached embeddings q, d, whose backward receives their gradients from the loss
    and re-runs the chunks with those gradients (pass 2). ``anchor`` (an empty tensor requiring grad) puts
    the function in the graph; it gets no gradient."""

    @staticmethod
    def forward(ctx, anchor, q, d, payload):
        ctx.payload = payload
        ctx.set_materialize_grads(False)
        return q.view_as(q), d.view_as(d)

    @staticmethod
    def backward(ctx, gq, gd):
        if ctx.payload is None:
            raise RuntimeError("GradCache.forward's loss was back-propagated twice; "
                               "its chunks are re-run only once")
        gc, towers, autocast_state, sync_leaves = ctx.payload
        ctx.payload = None
        with _autocast(autocast_state):
            gc._replay(towers, (gq, gd), sync_leaves)
        return None, None, None, None
