"""Weight clipping rules: choose the int4 scale of each output channel (or group).

``none``: scale = absmax / 7.
``mse``: data-free search over clip ratios alpha in [0.3, 1], per channel (or group),
minimising the weight reconstruction error ||w - Q_alpha(w)||^2, or, with an
`importance` vector over the inputs (saliency, Cao & Aref: E[x^2] of the layer's
actual inputs), the weighted error sum_j importance_j (w_j - Q_alpha(w)_j)^2, which
is the expected output error for uncorrelated inputs; a per-weight importance matrix
[out, in] (--saliency fisher: the Fisher diagonal E[(dL/dW)^2]) weights each weight
on its own. The other rules ignore `importance`.
``kl-j``: Settle et al. (arXiv 1805.07941, Algorithm 1) per channel (or group): a
histogram of |w| with sqrt(n) bins; for each candidate clip bin i > 8 the clipped
histogram p (tail folded into bin i-1) is compared with its 8-level requantization q
(bins merged into 8 chunks, each chunk's mass spread over its non-empty bins) by the
Jeffreys divergence sum (p - q) log(p / q); the threshold (i + 1/2) bin widths with the
lowest divergence sets scale = threshold / 7.
``kl``: the data-free statistical pre-calibration of Ghaffari et al. (arXiv 2501.09107:
keep the quantized weight distribution closest, in KL, to the original one), per
channel (or group), histogram based: p = histogram of w on [-absmax, absmax] in
KL_BINS bins; for each clip ratio alpha of the mse grid (scale s = alpha absmax / 7)
every bin goes to the int4 level its centre rounds to (clamped to [-8, 7], so the
clipped tails join the end levels), and q spreads each level's mass p(level) evenly
over that level's bins (the maximum-entropy density the int4 codes describe);
the alpha with the lowest KL(p || q) = sum p log(p / q) wins. q > 0 wherever p > 0,
so the divergence is always finite. Coarse levels (alpha near 1) and wide clipped
tails (small alpha) both raise it. Only the rule for picking the clip comes from the
paper, whose method text was not available (seed-methods.md (c)); its Adaptive-LASSO
outlier split is not used, because that would need a second scale and stored outlier
indices that plain int4 serving does not have. Measured on synthetic 32×4096 weights
(Gaussian, Laplace, Student-t(3)): per channel its weight MSE is 0.3-0.65× absmax and
within 5-35 % of the mse search; per group of 128 a group's 128 samples are too few, its
clips come out too tight (weight MSE 1.3-2× absmax), so prefer mse with --group-size.

``objective(w, scale, group_size, rule)`` evaluates, per channel (or group), what each
rule minimises at given scales (none: the weight MSE), for tests and reports.
"""
from __future__ import annotations

import torch

from ..quant import WEIGHT_QMAX, WEIGHT_QMIN, dequantize_weight, quantize_weight, weight_scale

CLIP_RULES = ("none", "mse", "kl-j", "kl")
MSE_GRID = 36
KL_BINS = 256


def choose_scale(w: torch.Tensor, group_size: int, rule: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    if rule == "none":
        return weight_scale(w, group_size)
    if rule == "mse":
        return _mse_scale(w, group_size, importance)
    if rule == "kl-j":
        return _klj_scale(w, group_size)
    if rule == "kl":
        return _kl_scale(w, group_size)
    raise ValueError(f"unknown clip rule {rule!r}; choose one of {', '.join(CLIP_RULES)}")


def rtn_weight(w: torch.Tensor, group_size: int, rule: str) -> torch.Tensor:
    """The float weight round-to-nearest int4 gives at the `rule`'s scales (what a --rtn conversion stores, dequantized)."""
    scale = choose_scale(w, group_size, rule)
    return dequantize_weight(quantize_weight(w, scale, group_size), scale, group_size)


def objective(w: torch.Tensor, scale: torch.Tensor, group_size: int, rule: str,
              importance: torch.Tensor | None = None) -> torch.Tensor:
    """What `rule` minimises, per output channel (or group) [out, groups], at `scale`."""
    if rule in ("none", "mse"):
        out, k = w.shape
        g = group_size or k
        wg = w.to(torch.float32).reshape(out, k // g, g)
        imp = _importance(importance, out, k, g)
        q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), WEIGHT_QMIN, WEIGHT_QMAX)
        return (imp * (q * scale.unsqueeze(-1) - wg) ** 2).sum(-1)
    if rule == "kl":
        hist, amax = _kl_hist(w, group_size)
        return _kl_div(hist, scale / amax)
    if rule == "kl-j":
        levels = 8
        hist, nb, amax = _klj_hist(w, group_size, levels)
        i_row = torch.clamp(torch.floor(scale * WEIGHT_QMAX / amax * nb + 1e-3), levels + 1, nb).long()
        out = torch.zeros_like(scale)
        for i in torch.unique(i_row).tolist():
            out = torch.where(i_row == i, _klj_div(hist, i, levels), out)
        return out
    raise ValueError(f"unknown clip rule {rule!r}; choose one of {', '.join(CLIP_RULES)}")


def _importance(importance: torch.Tensor | None, out: int, k: int, g: int) -> torch.Tensor:
    """Importance as [1 or out, groups, g]: a vector over the inputs ([k]) or a per-weight matrix ([out, k])."""
    if importance is None:
        return torch.ones(1, k // g, g)
    return importance.to(torch.float32).reshape(-1 if importance.dim() == 2 else 1, k // g, g)


def _mse_scale(w: torch.Tensor, group_size: int, importance: torch.Tensor | None) -> torch.Tensor:
    base = weight_scale(w, group_size)  # [out, groups]
    out, k = w.shape
    g = group_size or k
    wg = w.to(torch.float32).reshape(out, k // g, g)
    imp = _importance(importance, out, k, g)
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


def _klj_hist(w: torch.Tensor, group_size: int, levels: int):
    """Histogram of |w| / absmax in sqrt(g) bins per channel (or group): (hist, bins, absmax)."""
    base = weight_scale(w, group_size)  # absmax / 7, [out, groups]
    out, k = w.shape
    g = group_size or k
    nb = max(int(g**0.5), levels + 1)
    amax = base * WEIGHT_QMAX
    v = w.to(torch.float32).reshape(out, k // g, g).abs() / amax.unsqueeze(-1)
    idx = torch.clamp((v * nb).long(), max=nb - 1)
    hist = torch.zeros(out, k // g, nb).scatter_add_(-1, idx, torch.ones_like(v))
    return hist, nb, amax


def _klj_div(hist: torch.Tensor, i: int, levels: int) -> torch.Tensor:
    """Jeffreys divergence of the histogram clipped at bin i and its `levels`-level requantization."""
    eps = 1e-12
    p = hist[..., :i].clone()
    p[..., -1] += hist[..., i:].sum(-1)
    chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
    mass = torch.zeros(*hist.shape[:-1], levels).index_add_(-1, chunk, hist[..., :i])
    nonzero = (hist[..., :i] > 0).float()
    count = torch.zeros(*hist.shape[:-1], levels).index_add_(-1, chunk, nonzero)
    q = (mass / count.clamp_min(1))[..., chunk] * nonzero
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    q = q / q.sum(-1, keepdim=True).clamp_min(eps)
    return ((p - q) * torch.log((p + eps) / (q + eps))).sum(-1)


def _klj_scale(w: torch.Tensor, group_size: int, levels: int = 8) -> torch.Tensor:
    hist, nb, amax = _klj_hist(w, group_size, levels)
    best_j = torch.full_like(amax, float("inf"))
    best_i = torch.full_like(amax, float(nb))
    for i in range(levels + 1, nb + 1):
        j = _klj_div(hist, i, levels)
        better = j < best_j
        best_j = torch.where(better, j, best_j)
        best_i = torch.where(better, torch.full_like(best_i, float(i)), best_i)
    threshold = torch.clamp((best_i + 0.5) / nb, max=1.0) * amax
    return torch.where(threshold > 0, threshold / WEIGHT_QMAX, amax / WEIGHT_QMAX)


def _kl_hist(w: torch.Tensor, group_size: int):
    """Normalised histogram of w / absmax on [-1, 1] in KL_BINS bins: (p [out, groups, bins], absmax)."""
    amax = weight_scale(w, group_size) * WEIGHT_QMAX  # [out, groups]; 7 where a row is all zero
    out, k = w.shape
    g = group_size or k
    u = w.to(torch.float32).reshape(out, k // g, g) / amax.unsqueeze(-1)
    idx = torch.clamp(((u + 1) * (KL_BINS / 2)).long(), 0, KL_BINS - 1)
    hist = torch.zeros(out, k // g, KL_BINS).scatter_add_(-1, idx, torch.ones_like(u))
    return hist / g, amax


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))


def _kl_levels(step: torch.Tensor) -> torch.Tensor:
    """Index 0..15 of the int4 level each histogram bin's centre rounds to (grid step in absmax units)."""
    centres = (torch.arange(KL_BINS, dtype=torch.float32) + 0.5) * (2 / KL_BINS) - 1
    return torch.clamp(torch.round(centres / step.unsqueeze(-1)), WEIGHT_QMIN, WEIGHT_QMAX).long() - WEIGHT_QMIN


def _kl_div(p: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, q = p's mass per int4 level (grid step `step` in absmax units,
    a tensor broadcastable to p's rows) spread evenly over the level's bins.

    q is constant over a level's bins, so sum_b p_b log q_b = sum_l mass_l log(mass_l / count_l)."""
    level = _kl_levels(step).expand(p.shape)
    n = WEIGHT_QMAX - WEIGHT_QMIN + 1
    mass = torch.zeros(*p.shape[:-1], n).scatter_add_(-1, level, p)
    count = torch.zeros(*p.shape[:-1], n).scatter_add_(-1, level, torch.ones_like(p))
    return _xlogx(p).sum(-1) - (_xlogx(mass) - mass * torch.log(count.clamp_min(1))).sum(-1)


def _kl_scale(w: torch.Tensor, group_size: int) -> torch.Tensor:
    p, amax = _kl_hist(w, group_size)
    neg_entropy = _xlogx(p).sum(-1)
    n = WEIGHT_QMAX - WEIGHT_QMIN + 1
    best_kl = torch.full_like(amax, float("inf"))
    best = torch.ones_like(amax)
    for alpha in torch.linspace(1.0, 0.3, MSE_GRID).tolist():
        # the same bin -> level map for every row: level masses by one matmul
        onehot = torch.nn.functional.one_hot(_kl_levels(torch.tensor(alpha / WEIGHT_QMAX)), n).float()
        mass = p @ onehot
        kl = neg_entropy - (_xlogx(mass) - mass * torch.log(onehot.sum(0).clamp_min(1))).sum(-1)
        better = kl < best_kl - 1e-9
        best_kl = torch.where(better, kl, best_kl)
        best = torch.where(better, torch.full_like(best, alpha), best)
    return amax * best / WEIGHT_QMAX
