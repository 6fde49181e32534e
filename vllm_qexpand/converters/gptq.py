"""GPTQ (Frantar et al.) for one linear: quantize columns in order, pushing each
column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian H = 2 XᵀX / n of the layer's (rotated, expanded) inputs.

The Hessian of an expanded layer has rank ≤ N < M: damping (a fraction of the mean
diagonal added to it) keeps it invertible. Scales are fixed beforehand (by the clip
rule); act-order processes columns by decreasing Hessian diagonal with groups kept on
the original column index.
"""
from __future__ import annotations

import torch

from ..quant import WEIGHT_QMAX, WEIGHT_QMIN


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, group_size: int = 0,
                  act_order: bool = True, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """int4 codes [out, in] (int8) for weight `w` [out, in], Hessian `h` [in, in], scales [out, groups]."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    out, k = w.shape
    g = group_size or k
    col_scale = scale.to(torch.float64).repeat_interleave(g, dim=1)  # [out, in]: scale of each column

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = w1[:, i], col_scale[:, i1 + i]
            qi = torch.clamp(torch.round(col / s), WEIGHT_QMIN, WEIGHT_QMAX)
            q[:, i1 + i] = qi
            e = (col - qi * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 XᵀX / n for inputs x [..., in] (float64)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return 2.0 * x.t() @ x / x.shape[0]
