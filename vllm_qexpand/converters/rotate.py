"""Passes 3 and 4: the fused rotations R1 (residual stream) and R2 (per head).

R1 (hidden×hidden, orthogonal): the residual h becomes h' = h @ R1.
  readers  (q, k, v, gate, up, lm_head): W <- W @ R1
  writers  (embeddings, o_proj, down_proj outputs): E <- E @ R1, W <- R1.T @ W, b <- b @ R1
R1 = diag(s) @ A.T with A = hadamard_matrix(hidden) and s = ±1 signs drawn from
--seed (all +1 without a seed), so h' = T(h * s). Without a Hadamard of that size
R1 is a seeded random orthogonal matrix (reported).

choose_r1 (setup, --r1-candidates K > 1, after calibrate): the sign draws of seeds S .. S+K-1
(S = --seed, or 0) are each scored by heldout.quantized_loss, the held-out calibration loss of
the round-to-nearest model the conversion would write with that R1, and the lowest one is kept.
Two R1s with the same per-layer quantization error statistics can differ by 50% in W4A4
perplexity (docs/accuracy.md, "Where the rest of the gap is"); this picks a good draw by data.

R2 (head_dim×head_dim) = A_hd.T: each value head v becomes v @ R2, so
  v_proj rows of each kv head: W <- R2.T @ W (bias likewise); o_proj columns of each q head: W <- W @ R2.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..hadamard import factor, hadamard_matrix, hadamard_transform, random_orthogonal
from . import fuse_norms, load, online
from .state import ConvertError, ModelState, Part


def setup_r1(state: ModelState) -> None:
    if not state.options.r1:
        return
    n, seed = state.hidden, state.options.seed
    kp = factor(n)
    if kp is None:
        state.r1_matrix = random_orthogonal(n, seed or 0)
        state.r1 = {"kind": "random_orthogonal", "size": n, "seed": seed or 0}
        state.report["notes"].append(f"R1: no Hadamard of size {n} is known; used a seeded random orthogonal matrix")
        return
    _hadamard_r1(state, seed)


def _hadamard_r1(state: ModelState, seed: int | None) -> None:
    n = state.hidden
    if seed is None:
        signs = torch.ones(n, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    state.r1_signs = signs  # R1 = diag(signs) @ A.T, applied with the fast transform
    state.r1 = {"kind": "hadamard" if seed is None else "random_hadamard", "size": n, "k": factor(n)[0], "seed": seed}


def choose_r1(state: ModelState) -> None:
    """--r1-candidates K: keep the R1 sign draw (seeds S .. S+K-1) with the lowest held-out loss (module doc)."""
    o = state.options
    k = o.r1_candidates
    if k == 1:
        return
    if not isinstance(k, int) or k < 1:
        raise ConvertError(f"--r1-candidates {k}: must be a count >= 1")
    for bad, why in ((not o.r1, "--no-r1"), (o.rotation is not None, "--rotation FILE (R1 is given)"),
                     (o.scheme == "none", "--no-quant (no quantized model to score)"),
                     (state.r1 is not None and state.r1["kind"] == "random_orthogonal",
                      f"a hidden size without a Hadamard ({state.hidden})")):
        if bad:
            raise ConvertError(f"--r1-candidates {k} does not go with {why}")
    from . import heldout

    ids = heldout.heldout_tokens(state, "--r1-candidates")
    base = o.seed or 0
    losses = {}
    for seed in tqdm(range(base, base + k), desc="R1 candidates", unit="draw", disable=not o.progress):
        _hadamard_r1(state, seed)
        losses[seed] = heldout.quantized_loss(state, ids)
    best = min(losses, key=lambda s: (losses[s], s))
    _hadamard_r1(state, best)
    state.r1["candidates"] = k
    state.report["r1_candidates"] = {
        "seeds": [base, base + k - 1], "chosen": best, "heldout_tokens": int(ids.numel()),
        "losses": {str(s): round(v, 6) for s, v in losses.items()},
        "criterion": "mean next-token loss of the round-to-nearest model on held-out calibration windows",
    }


def _times_r1(state: ModelState, x: torch.Tensor) -> torch.Tensor:
    """x @ R1 in float64; the fast transform T(x * s) when R1 is a Hadamard."""
    x = x.double()
    if state.r1_matrix is not None:  # a random orthogonal or a learned R1 (learn.py)
        return x @ state.r1_matrix
    signs = state.r1_signs
    return hadamard_transform(x * signs, state.r1["k"])


def apply_r1(state: ModelState, part: Part) -> None:
    if state.r1 is None:
        return
    t = part.tensors
    if part.name == "embed":
        _rows_in_place(state, t["model.embed_tokens.weight"])
        return
    if part.name == "head":
        _rows_in_place(state, t["lm_head.weight"])
        return
    pre = f"model.layers.{part.layer}"
    for r in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        t[f"{pre}.{r}.weight"] = _times_r1(state, t[f"{pre}.{r}.weight"])
    for w in ("self_attn.o_proj", "mlp.down_proj"):
        # R1.T @ W = (W.T @ R1).T
        t[f"{pre}.{w}.weight"] = _times_r1(state, t[f"{pre}.{w}.weight"].t()).t().contiguous()
        if f"{pre}.{w}.bias" in t:
            t[f"{pre}.{w}.bias"] = _times_r1(state, t[f"{pre}.{w}.bias"])


def _rows_in_place(state: ModelState, x: torch.Tensor, chunk: int = 8192) -> None:
    # embeddings and lm_head can be large: rotate in float64 row chunks, in place
    for s in range(0, x.shape[0], chunk):
        x[s : s + chunk] = _times_r1(state, x[s : s + chunk]).to(x.dtype)


def setup_r2(state: ModelState) -> None:
    if not state.options.r2:
        return
    hd = state.head_dim
    if factor(hd) is None:
        state.report["notes"].append(f"R2 skipped: no Hadamard of size head_dim={hd}")
        return
    state.r2_matrix = hadamard_matrix(hd).t().contiguous()
    state.r2 = {"kind": "hadamard", "size": hd}


def apply_r2(state: ModelState, part: Part) -> None:
    if state.r2_matrix is None or part.layer is None:
        return
    r2, hd = state.r2_matrix, state.head_dim
    t = part.tensors
    pre = f"model.layers.{part.layer}.self_attn"
    wv = t[f"{pre}.v_proj.weight"]
    t[f"{pre}.v_proj.weight"] = torch.einsum("ji,hjc->hic", r2, wv.reshape(-1, hd, wv.shape[1])).reshape(wv.shape)
    if f"{pre}.v_proj.bias" in t:
        b = t[f"{pre}.v_proj.bias"]
        t[f"{pre}.v_proj.bias"] = (b.reshape(-1, hd) @ r2).reshape(b.shape)
    wo = t[f"{pre}.o_proj.weight"]
    t[f"{pre}.o_proj.weight"] = (wo.reshape(wo.shape[0], -1, hd) @ r2).reshape(wo.shape)


def rotated_part(state: ModelState, name: str, r1: bool = True) -> Part:
    """A part read again and transformed as the conversion does before quantizing: folded norms, R1 (unless
    `r1` is False: learn.py optimises it), R2, the online rotations with their expansion. For the passes
    that stream the model once more before the conversion proper (fisher, learn)."""
    part = load.read_part(state, name)
    fuse_norms.apply(state, part)
    if r1:
        apply_r1(state, part)
    apply_r2(state, part)
    online.apply_online(state, part)
    return part
