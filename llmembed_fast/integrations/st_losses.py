"""A sentence-transformers loss: CachedMultipleNegativesRankingLoss computed with GradCache + the fused loss.

``CachedFusedMNRLoss`` takes ``CachedMultipleNegativesRankingLoss``'s arguments and gives the same loss and
gradients (same model, batch and RNG; ``same_tower`` with hard negatives excepted, see its docstring; with
sentence-transformers 5.1 under dropout, given ``trim_padding=False``), with the loss stage done once by
``lf.contrastive_loss`` in O((B+N)*D) memory (every Matryoshka dim in the same pass, no per-dim rerun) and
the chunks re-run inside ``loss.backward()`` as the trainer calls it. Use it with
``SentenceTransformerTrainer`` like any loss.
"""
from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from llmembed_fast import _warn
from llmembed_fast.ops.contrastive import _check_dims, check_options
from llmembed_fast.training.grad_cache import GradCache, synced_module


def _is_cos_sim(fn) -> bool:
    if fn is None:
        return True
    try:
        from sentence_transformers import util
    except Exception:  # pragma: no cover - sentence-transformers is a dependency of this module's use
        util = None
    return ((util is not None and fn is getattr(util, "cos_sim", None))
            or getattr(fn, "__name__", "") == "cos_sim")


_Q2D, _D2Q, _Q2Q, _D2D = "query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc"


def _terms_of(directions, partition_mode) -> tuple[bool, bool]:
    """sentence-transformers' ``directions`` / ``partition_mode`` as (symmetric, same_tower)."""
    if isinstance(directions, str) or not all(isinstance(x, str) for x in directions):
        raise TypeError(f"directions must be a tuple of direction names, got {directions!r}")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    dirs = frozenset(directions)
    if dirs == {_Q2D}:
        return False, False
    if dirs == {_Q2D, _D2Q} and partition_mode == "per_direction":
        return True, False
    if dirs == {_Q2D, _Q2Q, _D2D} and partition_mode == "joint":
        return False, True
    raise ValueError(
        f"directions={tuple(directions)!r} with partition_mode={partition_mode!r} is not expressed by the "
        "fused loss; supported: ('query_to_doc',); ('query_to_doc', 'doc_to_query') with 'per_direction' "
        "(symmetric=True); ('query_to_doc', 'query_to_query', 'doc_to_doc') with 'joint' (same_tower=True)")


def _check_similarity(fn) -> None:
    if not _is_cos_sim(fn):
        raise ValueError("similarity_fct: only cosine similarity (sentence_transformers.util.cos_sim) is "
                         f"supported by the fused loss, got {getattr(fn, '__name__', fn)!r}")


def _check_hardness(mode, strength) -> None:
    if strength != 0:
        raise ValueError("hardness_mode / hardness_strength: hardness-weighted negatives are not supported "
                         f"by CachedFusedMNRLoss, got {mode!r} / {strength!r}")
    if mode is not None:  # sentence-transformers' loss takes this as a no-op too
        _warn.warn(f"hardness_mode={mode!r} has no effect with hardness_strength=0")


def _st_cached_base() -> type:
    """The base class. A sentence-transformers with the ``uses_gradient_cache`` marker
    (``sentence_transformers.base.losses.gradcache``; tested: 5.7, 6.x) asks each loss whether it caches
    gradients: a plain Module. Older ones (tested: 5.1 - 5.5) tell their cached losses apart by class
    (MatryoshkaLoss's and AdaptiveLayerLoss's ``isinstance(loss, CachedMultipleNegativesRankingLoss)``), so
    there the fused loss subclasses that class (it uses none of its methods), and MatryoshkaLoss hands it its
    dims instead of truncating the first pass's embeddings only."""
    import importlib

    try:
        importlib.import_module("sentence_transformers.base.losses.gradcache")
        return nn.Module
    except ImportError:
        pass
    for name in ("sentence_transformers.sentence_transformer.losses", "sentence_transformers.losses"):
        try:
            return importlib.import_module(name).CachedMultipleNegativesRankingLoss
        except (ImportError, AttributeError):
            continue
    return nn.Module  # not installed: the loss needs it only at use (and says so there)


class CachedFusedMNRLoss(_st_cached_base()):
    """Gradient-cached multiple-negatives ranking (InfoNCE) loss for sentence-transformers, fused.

    Inputs (as ``CachedMultipleNegativesRankingLoss``): (anchor, positive) pairs or (anchor, positive,
    negative_1, ..., negative_n) tuples; no labels. Anchor i's positive is row i of the positive column;
    every positive and negative of the batch is a candidate for every anchor. Padded and flattened
    (padding-free, ``cu_seq_lens_q``: sentence-transformers' flash-attention path) features both work.

    The positional arguments are ``CachedMultipleNegativesRankingLoss``'s, in its order (sentence-transformers
    6; in 5.1 ``gather_across_devices`` is the 5th: pass it by name). ``MatryoshkaLoss(model,
    CachedFusedMNRLoss(model), dims)`` works as with the cached loss it replaces, and computes every dim in
    the loss's one pass (as ``matryoshka_dims=`` does); its ``n_dims_per_step`` is followed where the
    sentence-transformers version hands it to cached losses (5.7, 6; 5.1 trains every dim each step).

    Args:
        model: a ``SentenceTransformer``.
        scale: 1 / temperature (20 == temperature 0.05).
        similarity_fct: cosine similarity only (``util.cos_sim`` or None); anything else raises ValueError.
        mini_batch_size: rows embedded at once (the memory knob).
        mini_batch_num_tokens: token-budget mini-batches, packed as sentence-transformers packs them:
            consecutive rows while their attended tokens fit (a longer row alone), ``mini_batch_size`` then
            unused. Needs features with an ``attention_mask`` (or flattened ones).
        gather_across_devices: negatives from every rank (``torch.distributed``); the loss is the global one
            and the gradients after DDP's averaging equal the single-process gradients of the global batch.
        directions / partition_mode: sentence-transformers' names for the terms: ``("query_to_doc",)``
            (default); ``("query_to_doc", "doc_to_query")`` with ``"per_direction"`` (= ``symmetric``);
            ``("query_to_doc", "query_to_query", "doc_to_doc")`` with ``"joint"`` (= ``same_tower``).
            Other combinations raise ValueError.
        show_progress_bar: accepted for compatibility (no progress bar is drawn).
        hardness_mode / hardness_strength: only strength 0 (no hardness weighting; a mode then only warns).
        symmetric: add the document->query direction (``directions=("query_to_doc", "doc_to_query")`` with
            ``partition_mode="per_direction"`` in sentence-transformers).
        same_tower: query-query and document-document similarities join the partition function (GTE): for
            anchor i with positive p, every other anchor and every candidate j != p (all positives and
            hard negatives). With hard negatives this differs from sentence-transformers'
            ``directions=("query_to_doc", "query_to_query", "doc_to_doc")``, whose ``doc_to_doc`` also
            leaves out the anchor's own hard negatives (equal for pairs).
        false_negative_margin: drop negatives scoring more than this above the positive.
        matryoshka_dims / matryoshka_weights: a weighted sum over embedding prefixes, in one pass (what
            ``MatryoshkaLoss`` wrapping the cached loss computes with one loss run per dim).
        trim_padding: embed each mini-batch at its own padded width (sentence-transformers 5.7 and 6 do the
            same; 5.1 embeds every mini-batch at the batch's width: ``trim_padding=False`` reproduces its
            numbers under dropout, whose masks depend on the width).
        sort_by_length: form the mini-batches from the rows sorted longest first (``lf.GradCache``'s
            ``sort_by_length``): with mixed lengths far fewer padded tokens are embedded, twice. The loss
            and gradients are the same, except that under dropout each mini-batch then draws other masks
            than in ``CachedMultipleNegativesRankingLoss``, whose mini-batches are the rows in order.
            Default False: the same mini-batches as that loss, so a run reproduces its numbers.
    """

    uses_gradient_cache = True  # sentence-transformers' marker: the backward re-embeds the mini-batches

    def __init__(self, model, scale: float = 20.0, similarity_fct=None, mini_batch_size: int = 32,
                 mini_batch_num_tokens: int | None = None, gather_across_devices: bool = False,
                 directions: tuple[str, ...] = (_Q2D,), partition_mode: str = "joint",
                 show_progress_bar: bool = False, hardness_mode: str | None = None,
                 hardness_strength: float = 0.0, *, symmetric: bool = False, same_tower: bool = False,
                 false_negative_margin: float | None = None, matryoshka_dims: Sequence[int] | None = None,
                 matryoshka_weights: Sequence[float] | None = None, trim_padding: bool = True,
                 sort_by_length: bool = False):
        nn.Module.__init__(self)  # not the sentence-transformers 5.1 base's (see _st_cached_base)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a SentenceTransformer, got {type(model).__name__}")
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)  # numpy scalars too
                or not (math.isfinite(scale) and scale > 0)):
            raise ValueError(f"scale must be a positive finite number (1 / temperature), got {scale!r}")
        _check_similarity(similarity_fct)
        if (isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, numbers.Integral)
                or mini_batch_size <= 0):
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and (isinstance(mini_batch_num_tokens, bool)
                                                  or not isinstance(mini_batch_num_tokens, numbers.Integral)
                                                  or mini_batch_num_tokens <= 0):
            raise ValueError("mini_batch_num_tokens must be a positive int or None, "
                             f"got {mini_batch_num_tokens!r}")
        _check_hardness(hardness_mode, hardness_strength)
        _terms_of(directions, partition_mode)
        # the fused loss's own checks, now rather than at the first step (a string was truthy here)
        opts = check_options(normalize=True, symmetric=symmetric, same_tower=same_tower, allow_tf32=True,
                             false_negative_margin=false_negative_margin, reduction="mean")
        false_negative_margin = opts["false_negative_margin"]
        self.model = model
        self.scale = float(scale)
        self.mini_batch_size = int(mini_batch_size)
        self.mini_batch_num_tokens = None if mini_batch_num_tokens is None else int(mini_batch_num_tokens)
        self.gather_across_devices = bool(gather_across_devices)
        self.show_progress_bar = bool(show_progress_bar)
        # sentence-transformers' settings, read at every step as its loss reads them (assignments after
        # construction take effect); symmetric / same_tower add to what directions / partition_mode say
        self._directions, self._partition_mode = tuple(directions), partition_mode
        self._hardness = (hardness_mode, hardness_strength)
        self._symmetric, self._same_tower = bool(symmetric), bool(same_tower)
        self.false_negative_margin = false_negative_margin
        self.matryoshka_dims, self.matryoshka_weights = self._sorted_dims(matryoshka_dims, matryoshka_weights)
        self.trim_padding = bool(trim_padding)
        self.sort_by_length = bool(sort_by_length)
        self.n_dims_per_step = -1  # MatryoshkaLoss's: a random subset of the dims per step when > 0

    @property
    def directions(self) -> tuple[str, ...]:
        return self._directions

    @directions.setter
    def directions(self, value) -> None:  # checked with partition_mode when a step reads them
        error = None
        for mode in ("joint", "per_direction"):  # valid with one of the modes (set next, perhaps)
            try:
                _terms_of(value, mode)
                break
            except ValueError as exc:
                error = exc
        else:
            raise error
        self._directions = tuple(value)

    @property
    def partition_mode(self) -> str:
        return self._partition_mode

    @partition_mode.setter
    def partition_mode(self, value) -> None:
        if value not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {value!r}")
        self._partition_mode = value

    @property
    def symmetric(self) -> bool:
        """The document->query term: given as ``symmetric=True`` or by ``directions`` / ``partition_mode``."""
        return self._symmetric or _terms_of(self._directions, self._partition_mode)[0]

    @symmetric.setter
    def symmetric(self, value) -> None:
        self._symmetric = bool(value)

    @property
    def same_tower(self) -> bool:
        """The query-query / document-document terms: ``same_tower=True`` or ``directions``."""
        return self._same_tower or _terms_of(self._directions, self._partition_mode)[1]

    @same_tower.setter
    def same_tower(self, value) -> None:
        self._same_tower = bool(value)

    @property
    def similarity_fct(self):
        from sentence_transformers import util

        return util.cos_sim

    @similarity_fct.setter
    def similarity_fct(self, value) -> None:
        _check_similarity(value)

    @property
    def hardness_mode(self):
        return self._hardness[0]

    @hardness_mode.setter
    def hardness_mode(self, value) -> None:
        _check_hardness(value, self._hardness[1])
        self._hardness = (value, self._hardness[1])

    @property
    def hardness_strength(self) -> float:
        return self._hardness[1]

    @hardness_strength.setter
    def hardness_strength(self, value) -> None:
        _check_hardness(None, value)
        self._hardness = (self._hardness[0], value)

    # sentence-transformers' gradient-cache protocol: MatryoshkaLoss replaces a cached loss's
    # ``calculate_loss`` with a decorator that reruns it per dim; here its dims join the one pass instead.
    @property
    def calculate_loss(self):
        """The loss of precomputed mini-batch embeddings ``reps`` ([[b, D] tensors] per column)."""
        return self._calculate_loss

    @calculate_loss.setter
    def calculate_loss(self, fn):
        dims = getattr(fn, "matryoshka_dims", None)
        if dims is None:
            raise TypeError("CachedFusedMNRLoss.calculate_loss can only be replaced by MatryoshkaLoss (its "
                            f"dims join the fused loss's one pass), got {type(fn).__name__}")
        if self.matryoshka_dims is not None:
            raise ValueError("CachedFusedMNRLoss already has matryoshka_dims: wrap it in MatryoshkaLoss or "
                             "pass matryoshka_dims=, not both")
        weights = getattr(fn, "matryoshka_weights", None)
        self.matryoshka_dims, self.matryoshka_weights = self._sorted_dims(dims, weights)
        self.n_dims_per_step = int(getattr(fn, "n_dims_per_step", -1))

    def _calculate_loss(self, reps, *args, **kwargs) -> torch.Tensor:
        columns = [torch.cat(list(col)) for col in reps]
        return self._loss(columns[0], torch.cat(columns[1:]), self._group()[0])

    @staticmethod
    def _sorted_dims(dims, weights):
        """MatryoshkaLoss lists dims largest first; the fused loss wants them increasing."""
        if dims is None:
            if weights is not None:
                raise ValueError("matryoshka_weights needs matryoshka_dims")
            return None, None
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
        dims = list(dims.tolist() if isinstance(dims, torch.Tensor) else dims)
        for d in dims:  # int() would truncate 32.5 to 32
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise TypeError(f"matryoshka_dims must hold ints, got {d!r}")
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
                kind = type(weights).__name__
                raise TypeError(f"matryoshka_weights must be a sequence of numbers, got {kind}")
            weights = list(weights.tolist() if isinstance(weights, torch.Tensor) else weights)
        weights = [1.0] * len(dims) if weights is None else weights
        if len(weights) != len(dims):
            raise ValueError(f"matryoshka_weights must have one weight per dim ({len(dims)}), "
                             f"got {len(weights)}")
        order = sorted(range(len(dims)), key=dims.__getitem__)
        # increasing, >= 1, finite weights (the bound by D waits for the embeddings)
        return _check_dims([int(dims[i]) for i in order], [weights[i] for i in order], None)

    def _encode(self, features: dict) -> torch.Tensor:
        mask = features.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            # sentence-transformers 5.1's Pooling(include_prompt=False) zeroes the prompt in the mask in
            # place: on the caller's tensor (a chunk is a view), the re-run would no longer attend to it
            features = dict(features, attention_mask=mask.clone())
        return self.model(features)["sentence_embedding"]

    def _group(self):
        if not self.gather_across_devices:
            return None, 1
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None, 1
        return dist.group.WORLD, dist.get_world_size()

    def _step_dims(self):
        """(dims, weights) for this step: all of them, or MatryoshkaLoss's random n_dims_per_step."""
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is None or not 0 < self.n_dims_per_step < len(dims):
            return dims, weights
        # MatryoshkaLoss samples indices into its dims listed largest first: the same draws pick the same dims
        n = len(dims)
        keep = sorted(n - 1 - i for i in random.sample(range(n), self.n_dims_per_step))
        return tuple(dims[i] for i in keep), tuple(weights[i] for i in keep)

    def _loss(self, q: torch.Tensor, d: torch.Tensor, group=None, dims=None) -> torch.Tensor:
        from llmembed_fast.ops.contrastive import contrastive_loss

        dims, weights = self._step_dims() if dims is None else dims
        return contrastive_loss(q, d, temperature=1.0 / self.scale, normalize=True, symmetric=self.symmetric,
                                same_tower=self.same_tower, false_negative_margin=self.false_negative_margin,
                                matryoshka_dims=dims, matryoshka_weights=weights, group=group)

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: torch.Tensor | None = None):
        """The loss (a 0-d tensor); its ``backward()`` re-embeds the mini-batches and fills the gradients."""
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError("CachedFusedMNRLoss needs at least 2 input columns (anchor, positive, ...), "
                             f"got {len(features)}")
        group, world = self._group()
        # self.model may be the DDP module the trainer put in the loss: its no_sync() must govern the chunks
        sync = synced_module(self.model)
        dims = self._step_dims()  # drawn once per step from Python's random, as MatryoshkaLoss draws them
        # with a token budget sentence-transformers ignores mini_batch_size: no row cap
        rows = self.mini_batch_size if self.mini_batch_num_tokens is None else 2**62
        gc = GradCache(self._encode, lambda q, d: self._loss(q, d, group, dims), rows,
                       chunk_tokens=self.mini_batch_num_tokens,
                       trim_padding=self.trim_padding, sort_by_length=self.sort_by_length,
                       grad_multiplier=float(world), sync_module=sync)
        return gc.forward(features[0], features[1:])

    def get_config_dict(self) -> dict:
        return {"scale": self.scale, "similarity_fct": "cos_sim", "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens,
                "gather_across_devices": self.gather_across_devices, "symmetric": self.symmetric,
                "same_tower": self.same_tower, "false_negative_margin": self.false_negative_margin,
                "matryoshka_dims": self.matryoshka_dims, "matryoshka_weights": self.matryoshka_weights,
                "sort_by_length": self.sort_by_length}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return ("@misc{gao2021scaling, title={Scaling Deep Contrastive Learning Batch Size under Memory "
                "Limited Setup}, author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan}, "
                "year={2021}, eprint={2101.06983}, archivePrefix={arXiv}, primaryClass={cs.LG}}")
