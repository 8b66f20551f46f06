"""A sentence-transformers loss: CachedMultipleNegativesRankingLoss computed with GradCache + the fused loss.

``CachedFusedMNRLoss`` takes ``CachedMultipleNegativesRankingLoss``'s arguments and gives the same loss and
gradients (same model, batch and RNG; ``same_tower`` with hard negatives excepted, see its docstring), with
the loss stage done once by ``lf.contrastive_loss`` in O((B+N)*D) memory (every Matryoshka dim in the same
pass, no per-dim rerun) and the chunks re-run inside ``loss.backward()`` as the trainer calls it. Use it
with ``SentenceTransformerTrainer`` like any loss.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

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


class CachedFusedMNRLoss(nn.Module):
    """Gradient-cached multiple-negatives ranking (InfoNCE) loss for sentence-transformers, fused.

    Inputs (as ``CachedMultipleNegativesRankingLoss``): (anchor, positive) pairs or (anchor, positive,
    negative_1, ..., negative_n) tuples; no labels. Anchor i's positive is row i of the positive column;
    every positive and negative of the batch is a candidate for every anchor.

    Args:
        model: a ``SentenceTransformer``.
        scale: 1 / temperature (20 == temperature 0.05).
        similarity_fct: cosine similarity only (``util.cos_sim`` or None); anything else raises ValueError.
        mini_batch_size: rows embedded at once (the memory knob).
        gather_across_devices: negatives from every rank (``torch.distributed``); the loss is the global one
            and the gradients after DDP's averaging equal the single-process gradients of the global batch.
        show_progress_bar: accepted for compatibility (no progress bar is drawn).
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
        trim_padding: embed each mini-batch at its own padded width (sentence-transformers does the same).
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=None, mini_batch_size: int = 32,
                 gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                 symmetric: bool = False, same_tower: bool = False,
                 false_negative_margin: float | None = None, matryoshka_dims: Sequence[int] | None = None,
                 matryoshka_weights: Sequence[float] | None = None, trim_padding: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a SentenceTransformer, got {type(model).__name__}")
        if (isinstance(scale, bool) or not isinstance(scale, (int, float))
                or not (math.isfinite(scale) and scale > 0)):
            raise ValueError(f"scale must be a positive finite number (1 / temperature), got {scale!r}")
        if not _is_cos_sim(similarity_fct):
            raise ValueError("similarity_fct: only cosine similarity (sentence_transformers.util.cos_sim) is "
                             "supported by the fused loss, "
                             f"got {getattr(similarity_fct, '__name__', similarity_fct)!r}")
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        self.model = model
        self.scale = float(scale)
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = bool(gather_across_devices)
        self.show_progress_bar = bool(show_progress_bar)
        self.symmetric, self.same_tower = bool(symmetric), bool(same_tower)
        self.false_negative_margin = false_negative_margin
        self.matryoshka_dims, self.matryoshka_weights = self._sorted_dims(matryoshka_dims, matryoshka_weights)
        self.trim_padding = bool(trim_padding)

    @staticmethod
    def _sorted_dims(dims, weights):
        """MatryoshkaLoss lists dims largest first; the fused loss wants them increasing."""
        if dims is None:
            if weights is not None:
                raise ValueError("matryoshka_weights needs matryoshka_dims")
            return None, None
        dims = [int(d) for d in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(dims):
            raise ValueError(f"matryoshka_weights must have one weight per dim ({len(dims)}), "
                             f"got {len(weights)}")
        order = sorted(range(len(dims)), key=dims.__getitem__)
        return tuple(dims[i] for i in order), tuple(weights[i] for i in order)

    def _encode(self, features: dict) -> torch.Tensor:
        return self.model(features)["sentence_embedding"]

    def _group(self):
        if not self.gather_across_devices:
            return None, 1
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None, 1
        return dist.group.WORLD, dist.get_world_size()

    def _loss(self, q: torch.Tensor, d: torch.Tensor, group=None) -> torch.Tensor:
        from llmembed_fast.ops.contrastive import contrastive_loss

        return contrastive_loss(q, d, temperature=1.0 / self.scale, normalize=True, symmetric=self.symmetric,
                                same_tower=self.same_tower, false_negative_margin=self.false_negative_margin,
                                matryoshka_dims=self.matryoshka_dims,
                                matryoshka_weights=self.matryoshka_weights, group=group)

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
        gc = GradCache(self._encode, lambda q, d: self._loss(q, d, group), self.mini_batch_size,
                       trim_padding=self.trim_padding, grad_multiplier=float(world), sync_module=sync)
        return gc.forward(features[0], features[1:])

    def get_config_dict(self) -> dict:
        return {"scale": self.scale, "similarity_fct": "cos_sim", "mini_batch_size": self.mini_batch_size,
                "gather_across_devices": self.gather_across_devices, "symmetric": self.symmetric,
                "same_tower": self.same_tower, "false_negative_margin": self.false_negative_margin,
                "matryoshka_dims": self.matryoshka_dims, "matryoshka_weights": self.matryoshka_weights}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return ("@misc{gao2021scaling, title={Scaling Deep Contrastive Learning Batch Size under Memory "
                "Limited Setup}, author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan}, "
                "year={2021}, eprint={2101.06983}, archivePrefix={arXiv}, primaryClass={cs.LG}}")
