"""Weight clipping rules: choose the int4 scale of each output channel (or group).

``none``: scale = absmax / 7.
``mse``: data-free search over clip ratios alpha in [0.3, 1], per channel (or group),
minimising the weight reconstruction error ||w - Q_alpha(w)||^2, or, with an
`importance` vector over the inputs (saliency, Cao & Aref: E[x^2] of the layer's
actual inputs), the weighted error sum_j importance_j (w_j - Q_alpha(w)_j)^2, which
is the expected output error for uncorrelated inputs.
"""
from __future__ import annotations

import torch

from ..quant import WEIGHT_QMAX, WEIGHT_QMIN, weight_scale

CLIP_RULES = ("none", "mse")
MSE_GRID = 36


def choose_scale(w: torch.Tensor, group_size: int, rule: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    if rule == "none":
        return weight_scale(w, group_size)
    if rule == "mse":
        return _mse_scale(w, group_size, importance)
    raise ValueError(f"unknown clip rule {rule!r}; choose one of {', '.join(CLIP_RULES)}")


def _mse_scale(w: torch.Tensor, group_size: int, importance: torch.Tensor | None) -> torch.Tensor:
    base = weight_scale(w, group_size)  # [out, groups]
    out, k = w.shape
    g = group_size or k
    wg = w.to(torch.float32).reshape(out, k // g, g)
    imp = torch.ones(1, k // g, g) if importance is None else importance.to(torch.float32).reshape(1, k // g, g)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for alpha in torch.linspace(1.0, 0.3, MSE_GRID).tolist():
        s = base * alpha
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1)), WEIGHT_QMIN, WEIGHT_QMAX)
        err = (imp * (q * s.unsqueeze(-1) - wg) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best
