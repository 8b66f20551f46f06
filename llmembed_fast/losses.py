"""``nn.Module`` losses over precomputed embeddings."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from llmembed_fast.ops.contrastive import _check_dims, check_options, contrastive_loss


class ContrastiveLoss(nn.Module):
    """InfoNCE over in-batch and hard negatives (``llmembed_fast.contrastive_loss``) as a module.

    Args:
        temperature: initial temperature (``scale = 1 / temperature``; sentence-transformers' 20 is 0.05).
        learn_temperature: learn it, CLIP-style, as ``log_scale = log(1 / temperature)`` (a parameter).
            Each forward first clamps the parameter itself to ``log(max_scale)`` (as CLIP clamps it after
            each step), so the gradient keeps flowing and the temperature can come back down.
        max_scale: upper bound of 1 / temperature when learned (CLIP uses 100); the initial
            ``1 / temperature`` must not exceed it.
        The other keywords are those of :func:`llmembed_fast.contrastive_loss` (all but ``eps``).

    ``forward(q [B, D], d [N, D], labels=None)`` returns the loss.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        learn_temperature: bool = False,
        max_scale: float = 100.0,
        normalize: bool = True,
        symmetric: bool = False,
        same_tower: bool = False,
        false_negative_margin: float | None = None,
        matryoshka_dims=None,
        matryoshka_weights=None,
        reduction: str = "mean",
        group=None,
        allow_tf32: bool = True,
    ):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not (temperature > 0 and math.isfinite(temperature) and math.isfinite(1.0 / float(temperature))):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        temperature = float(temperature)
        if isinstance(max_scale, bool) or not isinstance(max_scale, numbers.Real):
            raise TypeError(f"max_scale must be a number, got {type(max_scale).__name__}")
        if not (max_scale > 0 and math.isfinite(max_scale)):
            raise ValueError(f"max_scale must be a positive finite number, got {max_scale!r}")
        if learn_temperature and 1.0 / temperature > max_scale * (1 + 1e-12):
            raise ValueError(f"temperature={temperature!r} is below 1 / max_scale = {1.0 / max_scale!r}: a "
                             "learned temperature would start clamped (raise max_scale or the temperature)")
        self.learn_temperature = bool(learn_temperature)
        self.max_scale = float(max_scale)
        self.fixed_temperature = float(temperature)  # max_scale bounds only a learned temperature
        if self.learn_temperature:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # checked now, not at the first forward (mid-training); dims are bounded by D there
        check_options(normalize=normalize, symmetric=symmetric, same_tower=same_tower, allow_tf32=allow_tf32,
                      false_negative_margin=false_negative_margin, reduction=reduction)
        _check_dims(matryoshka_dims, matryoshka_weights, None)
        if group is not None:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got "
                                f"{type(group).__name__}")
        self.kwargs = dict(
            normalize=normalize,
            symmetric=symmetric,
            same_tower=same_tower,
            false_negative_margin=false_negative_margin,
            matryoshka_dims=matryoshka_dims,
            matryoshka_weights=matryoshka_weights,
            reduction=reduction,
            group=group,
            allow_tf32=allow_tf32,
        )

    @property
    def temperature(self) -> torch.Tensor | float:
        """The temperature: 1 / min(exp(log_scale), max_scale) when learned (a tensor), else a float."""
        if not self.learn_temperature:
            return self.fixed_temperature
        # min(log_scale, log(max_scale)) with a gradient of 1 everywhere: torch >= 2.14 gives clamp a zero
        # gradient at its bound, where forward's in-place clamp leaves the parameter (it would stay stuck)
        s = self.log_scale
        return 1.0 / (s - (s.detach() - math.log(self.max_scale)).clamp_min(0.0)).exp()

    def forward(self, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.learn_temperature:
            # clamp the parameter, not its use: a clamped use would have zero gradient and stay stuck.
            # Through .data: no version bump, so an earlier call's graph (two losses summed before one
            # backward) stays valid.
            self.log_scale.data.clamp_(max=math.log(self.max_scale))
        t = self.temperature
        return contrastive_loss(q, d, labels=labels, temperature=t, **self.kwargs)

    def extra_repr(self) -> str:
        opts = ", ".join(
            f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None and v is not False and k != "group"
        )
        return f"learn_temperature={self.learn_temperature}, {opts}"
