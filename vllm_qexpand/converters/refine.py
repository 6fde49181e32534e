"""Singular-value refinement (--refine sde): CQE+ SDE / LSI on the matrix actually quantized.

For one linear whose final (rotated, expanded) weight is W = U·diag(S)·Vᵀ, learn an
increment Δ in the Σ slot — diagonal (LSI), or banded with --refine-band b (SDE: the
diagonal plus b off-diagonals on each side) — so that the int4 weight of

    W' = U·(diag(S) + Δ)·Vᵀ = W + U·Δ·Vᵀ

reproduces the float layer's outputs on calibration inputs:

    loss(Δ) = tr((Q(W') − W) · H · (Q(W') − W)ᵀ) / tr(W·H·Wᵀ),    H = 2XᵀX/n

(H from the block-sequential calibration, i.e. the inputs after the online rotation and
expansion). Q is round-to-nearest with the clip rule's scale of W held fixed while
training; round() is passed straight through (STE; entries clamped to the int4 range get
no gradient) and the gradient is written out by hand. Adam, `steps` steps; the Δ with the
lowest fit loss seen is kept. Δ is parameterised in units of the RMS singular value, so
`lr` does not depend on the weight's scale.

Held-out guard (the authors report LSI overfitting the calibration data): the calibration
windows are split into fit and held-out windows. After training, the clip rule picks the
scale again on W', and Q(W') is compared with Q(W) (each with its own clip scale; with
--gptq both through GPTQ on the fit Hessian) on the held-out Hessian; Δ is kept only if
the held-out loss is lower. Fit and held-out losses before/after are reported per layer.

Cost per linear [out, in], r = min(out, in): one float32 SVD, O(out·in·r) but run by
LAPACK far below GEMM speed (0.02-0.4 s per SmolLM2-135M matrix on a busy core, ~10 % of
the refinement there), plus per step three GEMMs: U·Δ·Vᵀ (out·r·in), E·H (out·in²) and
(E·H)·V (out·in·r); the final check adds two clip searches and two losses (two GPTQ runs
with --gptq). One layer at a time: memory is a few copies of W plus two Hessians.
See docs/refine.md.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..quant import WEIGHT_QMAX, WEIGHT_QMIN, dequantize_weight
from .clip import choose_scale
from .gptq import gptq_quantize
from .state import ConvertError, ModelState

REFINE_METHODS = ("none", "sde")
SMALL = 1 << 18  # weights with at most this many entries are refined on one thread (see refine_linear)


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized RTN weight, mask of entries inside the int4 range) for scales [out, groups]."""
    s = scale.repeat_interleave(g, dim=1) if scale.shape[1] > 1 else scale
    v = w / s
    r = torch.round(v)
    inside = (r >= WEIGHT_QMIN) & (r <= WEIGHT_QMAX)
    return torch.clamp(r, WEIGHT_QMIN, WEIGHT_QMAX) * s, inside


def output_loss(wq: torch.Tensor, w: torch.Tensor, h: torch.Tensor, ref: float) -> float:
    """tr((wq − w) H (wq − w)ᵀ) / ref."""
    e = wq - w
    return float(((e @ h) * e).sum()) / ref


def _band(theta: torch.Tensor, band: int) -> torch.Tensor:
    """Dense r×r matrix with theta[band + d] on diagonal d (d = −band..band; entries past the ends unused)."""
    r = theta.shape[1]
    d = torch.diag(theta[band])
    for k in range(1, band + 1):
        d = d + torch.diag(theta[band + k, : r - k], k) + torch.diag(theta[band - k, : r - k], -k)
    return d


def _delta_w(u: torch.Tensor, vh: torch.Tensor, delta: torch.Tensor, band: int) -> torch.Tensor:
    """U·Δ·Vᵀ for the banded Δ stored as delta [2·band + 1, r]."""
    return (u * delta[band]) @ vh if band == 0 else u @ _band(delta, band) @ vh


@torch.no_grad()
def ste_loss_grad(w, u, vh, delta, band, scale, g, h, ref) -> tuple[float, torch.Tensor]:
    """Loss tr(E H Eᵀ)/ref of E = Q(W + UΔVᵀ) − W (RTN at fixed `scale`) and its gradient w.r.t.
    `delta` [2·band + 1, r] with round() passed straight through (clamped entries get none)."""
    wq, inside = _fake_quant(w + _delta_w(u, vh, delta, band), scale, g)
    e = wq - w
    eh = e @ h
    loss = float((eh * e).sum()) / ref
    gv = ((2.0 / ref) * eh * inside) @ vh.t()  # dL/dW' · V  [out, r]
    if band == 0:
        return loss, (u * gv).sum(0).unsqueeze(0)
    m = u.t() @ gv  # [r, r]: entry (i, j) = dL/dΔ_ij
    r = m.shape[0]
    grad = torch.zeros_like(delta)
    grad[band] = torch.diagonal(m)
    for d in range(1, band + 1):
        grad[band + d, : r - d] = torch.diagonal(m, d)
        grad[band - d, : r - d] = torch.diagonal(m, -d)
    return loss, grad


def refine_linear(
    w: torch.Tensor,
    h_fit: torch.Tensor,
    h_held: torch.Tensor,
    group_size: int,
    clip: str,
    importance: torch.Tensor | None = None,
    steps: int = 20,
    lr: float = 2e-3,
    band: int = 0,
    quantizer: Callable | None = None,
) -> tuple[torch.Tensor, dict]:
    """Refined weight W' (or `w` itself when the held-out guard rejects it) and a report dict.

    `quantizer(w, scale)` -> dequantized weight used for the before/after comparison
    (default round-to-nearest; the converter passes GPTQ on the fit Hessian with --gptq).

    Small weights run on one thread: their many small ops gain nothing from more, and on a
    loaded machine every multi-threaded op waits for a descheduled worker (measured on
    2 busy cores: 4 s instead of 0.04 s for a 64×64 layer).
    """
    if w.numel() > SMALL or torch.get_num_threads() == 1:
        return _refine_linear(w, h_fit, h_held, group_size, clip, importance, steps, lr, band, quantizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _refine_linear(w, h_fit, h_held, group_size, clip, importance, steps, lr, band, quantizer)
    finally:
        torch.set_num_threads(threads)


def _refine_linear(w, h_fit, h_held, group_size, clip, importance, steps, lr, band, quantizer):
    t0 = time.perf_counter()
    w = w.to(torch.float32)
    hf, hh = h_fit.to(torch.float32), h_held.to(torch.float32)
    out, k = w.shape
    g = group_size or k
    quantizer = quantizer or (lambda ww, s: _fake_quant(ww, s, g)[0])
    ref_f = max(float(((w @ hf) * w).sum()), 1e-30)
    ref_h = max(float(((w @ hh) * w).sum()), 1e-30)

    scale0 = choose_scale(w, group_size, clip, importance)
    q0 = quantizer(w, scale0)
    fit0, held0 = output_loss(q0, w, hf, ref_f), output_loss(q0, w, hh, ref_h)

    t1 = time.perf_counter()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u [out, r], vh [r, in]
    t_svd = time.perf_counter() - t1
    r = s.numel()
    unit = float(s.pow(2).mean().sqrt()) or 1.0
    theta = torch.zeros(2 * band + 1, r, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    best_loss, best_theta, best_step = float("inf"), theta.detach().clone(), 0
    for step in range(steps):
        loss, grad = ste_loss_grad(w, u, vh, theta.detach() * unit, band, scale0, g, hf, ref_f)
        if loss < best_loss:
            best_loss, best_theta, best_step = loss, theta.detach().clone(), step
        theta.grad = grad * unit
        opt.step()

    delta = best_theta * unit
    w1 = w + _delta_w(u, vh, delta, band)
    scale1 = choose_scale(w1, group_size, clip, importance)
    q1 = quantizer(w1, scale1)
    fit1, held1 = output_loss(q1, w, hf, ref_f), output_loss(q1, w, hh, ref_h)
    moved = bool(best_theta.abs().sum() > 0)
    kept = moved and held1 < held0
    info = {
        "kept": kept,
        "reason": ("held-out loss fell" if kept else "held-out loss did not fall: Δ = 0 kept" if moved
                   else "no step lowered the fit loss: Δ = 0 kept"),
        "fit_before": round(fit0, 8), "fit_after": round(fit1, 8),
        "held_before": round(held0, 8), "held_after": round(held1, 8),
        "steps": steps, "best_step": best_step, "band": band, "rank": r,
        "delta_rel": round(float(delta.norm() / s.norm().clamp_min(1e-30)), 6),
        "svd_s": round(t_svd, 3), "total_s": round(time.perf_counter() - t0, 3),
    }
    return (w1 if kept else w), info


def setup(state: ModelState) -> None:
    """Check the --refine options; hold out the last windows of --calib (calibrate.setup tokenized them)."""
    o = state.options
    if o.refine not in REFINE_METHODS:
        raise ConvertError(f"--refine {o.refine!r}: choose one of {', '.join(REFINE_METHODS)}")
    if o.refine == "none":
        return
    if o.refine_steps < 1 or o.refine_lr <= 0 or o.refine_band < 0:
        raise ConvertError(f"--refine: need --refine-steps >= 1, --refine-lr > 0, --refine-band >= 0 "
                           f"(got {o.refine_steps}, {o.refine_lr}, {o.refine_band})")
    if not 0 < o.refine_heldout < 1:
        raise ConvertError(f"--refine-heldout {o.refine_heldout}: must be a fraction in (0, 1)")
    held = max(1, round(o.refine_heldout * o.calib_samples))
    if held >= o.calib_samples:
        raise ConvertError(f"--refine needs fit and held-out windows: --calib-samples {o.calib_samples} is too few "
                           f"(at least 2; {held} would be held out)")
    state.calib_heldout = held
    state.report["refine"] = {"method": o.refine, "steps": o.refine_steps, "lr": o.refine_lr, "band": o.refine_band,
                              "fit_windows": o.calib_samples - held, "heldout_windows": held,
                              "order": "refine, then the clip rule on W', then RTN" + (" / GPTQ" if o.gptq else ""),
                              "kept": 0, "rejected": 0}


def apply(state: ModelState, w: torch.Tensor, h: torch.Tensor, h_held: torch.Tensor,
          importance: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Refine one converter linear: the Hessian `h` of all windows is split into fit and held-out."""
    o = state.options
    f = state.calib_heldout / o.calib_samples
    h_fit = (h - f * h_held) / (1 - f)
    g = state.group_size
    quantizer = None
    if o.gptq:  # the guard compares what will be written: GPTQ (on the fit Hessian) of W and of W'
        def quantizer(ww, s):
            return dequantize_weight(gptq_quantize(ww, h_fit, s, g, act_order=o.act_order, damp=o.damp), s, g)
    w1, info = refine_linear(w, h_fit, h_held, g, o.clip, importance, steps=o.refine_steps, lr=o.refine_lr,
                             band=o.refine_band, quantizer=quantizer)
    summary = state.report.get("refine")
    if summary is not None:
        summary["kept" if info["kept"] else "rejected"] += 1
    return w1, info
