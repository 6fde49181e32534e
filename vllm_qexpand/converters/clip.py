"""Weight clipping rules: choose the int4 scale of each output channel (or group).

``none``: scale = absmax / 7.
``mse``: data-free search over clip ratios alpha in [0.3, 1], per channel (or group),
minimising the weight reconstruction error ||w - Q_alpha(w)||^2, or, with an
`importance` vector over the inputs (saliency, Cao & Aref: E[x^2] of the layer's
actual inputs), the weighted error sum_j importance_j (w_j - Q_alpha(w)_j)^2, which
is the expected output error for uncorrelated inputs.
``kl-j``: Settle et al. (arXiv 1805.07941, Algorithm 1) per channel (or group): a
histogram of |w| with sqrt(n) bins; for each candidate clip bin i > 8 the clipped
histogram p (tail folded into bin i-1) is compared with its 8-level requantization q
(bins merged into 8 chunks, each chunk's mass spread over its non-empty bins) by the
Jeffreys divergence sum (p - q) log(p / q); the threshold (i + 1/2) bin widths with the
lowest divergence sets scale = threshold / 7.
"""
from __future__ import annotations

import torch

from ..quant import WEIGHT_QMAX, WEIGHT_QMIN, weight_scale

CLIP_RULES = ("none", "mse", "kl-j")
MSE_GRID = 36


def choose_scale(w: torch.Tensor, group_size: int, rule: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    if rule == "none":
        return weight_scale(w, group_size)
    if rule == "mse":
        return _mse_scale(w, group_size, importance)
    if rule == "kl-j":
        return _klj_scale(w, group_size)
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


def _klj_scale(w: torch.Tensor, group_size: int, levels: int = 8) -> torch.Tensor:
    base = weight_scale(w, group_size)  # absmax / 7, [out, groups]
    out, k = w.shape
    g = group_size or k
    nb = max(int(g**0.5), levels + 1)
    amax = base * WEIGHT_QMAX
    v = w.to(torch.float32).reshape(out, k // g, g).abs() / amax.unsqueeze(-1)
    idx = torch.clamp((v * nb).long(), max=nb - 1)
    hist = torch.zeros(out, k // g, nb).scatter_add_(-1, idx, torch.ones_like(v))
    best_j = torch.full_like(base, float("inf"))
    best_i = torch.full_like(base, float(nb))
    eps = 1e-12
    for i in range(levels + 1, nb + 1):
        p = hist[..., :i].clone()
        p[..., -1] += hist[..., i:].sum(-1)
        chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        mass = torch.zeros(out, k // g, levels).index_add_(-1, chunk, hist[..., :i])
        nonzero = (hist[..., :i] > 0).float()
        count = torch.zeros(out, k // g, levels).index_add_(-1, chunk, nonzero)
        q = (mass / count.clamp_min(1))[..., chunk] * nonzero
        p = p / p.sum(-1, keepdim=True).clamp_min(eps)
        q = q / q.sum(-1, keepdim=True).clamp_min(eps)
        j = ((p - q) * torch.log((p + eps) / (q + eps))).sum(-1)
        better = j < best_j
        best_j = torch.where(better, j, best_j)
        best_i = torch.where(better, torch.full_like(best_i, float(i)), best_i)
    threshold = torch.clamp((best_i + 0.5) / nb, max=1.0) * amax
    return torch.where(threshold > 0, threshold / WEIGHT_QMAX, base)
