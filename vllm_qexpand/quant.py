"""Quantizers, int4 packing and the quantized linear: the reference math.

Converter, torch reference evaluator and the CPU serving path all call these
functions; the Triton kernels are tested against them.

Conventions (see docs/format.md):
- weights: signed int4 in [-8, 7], symmetric, scale = clip * absmax / 7,
  one scale per output channel (group_size = 0) or per group of `group_size`
  inputs; stored as value + 8 (0..15), eight nibbles per int32 word along the
  input dim, nibble j of word w holding input 8*w + j at bits 4*j..4*j+3.
- activations: dynamic, symmetric, per token: scale = (absmax * clip) / qmax (float32, in
  that order), q = clamp(round(x / scale), -qmax - 1, qmax), bits in {4, 8}; `clip` in (0, 1]
  is the checkpoint's `activations.clip` (1.0: no clipping, the only rule of format version 1).
"""
from __future__ import annotations

import torch

from .hadamard import hadamard_transform

WEIGHT_QMIN, WEIGHT_QMAX = -8, 7
PACK = 8  # int4 values per int32 word


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scale(w: torch.Tensor, group_size: int = 0, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Absmax scale (times `clip`) per output channel [out, 1] or per group [out, in/group]."""
    wg = _grouped(w, group_size)
    amax = wg.abs().amax(dim=-1)
    scale = amax * clip / WEIGHT_QMAX
    return torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"input size {k} is not a multiple of group size {g}")
    return w.reshape(out, k // g, g)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Round-to-nearest int4 codes (int8 tensor, values in [-8, 7]) for the given scales."""
    wg = _grouped(w.to(torch.float32), group_size)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), WEIGHT_QMIN, WEIGHT_QMAX)
    return q.reshape(w.shape).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Float32 weight from int4 codes and scales."""
    qg = _grouped(q.to(torch.float32), group_size)
    return (qg * scale.unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] int4 codes in [-8, 7] -> [out, in/8] int32 (value + 8, nibble j = input 8w+j)."""
    out, k = q.shape
    if k % PACK:
        raise ValueError(f"input size {k} is not a multiple of {PACK}")
    u = (q.to(torch.int64) + 8).reshape(out, k // PACK, PACK)
    word = (u << torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)).sum(dim=-1)  # 0 .. 2^32-1
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [out, in/8] int32 -> [out, in] int8 codes in [-8, 7]."""
    out, w = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (u - 8).reshape(out, w * PACK).to(torch.int8)


def quantize_activation(
    x: torch.Tensor, bits: int, amax: torch.Tensor | None = None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization: (codes as x.dtype-free float32, scale [T, 1]).

    `amax` [T, 1] replaces max|x| per token, e.g. the maximum over the tensor-parallel ranks
    that each hold a slice of the token (so every rank quantizes with the full token's scale).
    `clip` < 1 scales that max down (float32 product, then the division): values beyond
    clip·max saturate at the end codes, the rest get a finer step.
    """
    qm = qmax(bits)
    xf = x.to(torch.float32)
    if amax is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = amax.to(torch.float32)
    if clip != 1.0:
        amax = amax * clip  # float32 product: the Python float is rounded to float32 first, as in the kernel
    scale = amax / qm
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xf / scale), -qm - 1, qm)
    return q, scale


# ----------------------------------------------------------------------------- integer-exact GEMM
# Every CPU layout of a w4a4/w4a8 linear (oneDNN int8 and float32 GEMMs) and the torch reference
# compute the same bits for a token, whatever else is in the batch, by multiplying *codes* and
# applying the scales afterwards in one fixed order (the Triton kernels sum codes exactly too and
# are batch invariant among their own tile configurations, but round activations with one
# reciprocal per token: their codes can differ from these at a .5 boundary):
#
#     acc[t, n] = Σ_k q_x[t, k] · q_w[n, k]          an exact integer (int32, or float32 below 2^24)
#     y[t, n]   = (float32(acc[t, n]) · s_w[n]) · s_x[t]
#
# (per group of g inputs: y = (Σ_g float32(acc_g) · s_w[n, g], summed in group order) · s_x[t]).
# A float32 GEMM over integer-valued operands is exact whatever its summation order while no
# partial sum can exceed 2^24; `exact_in_float32` says when that holds, else the sum is taken
# in float64 (exact to 2^53) and rounded once, as the int32 -> float32 conversion rounds.

FLOAT32_EXACT_INT = 2**24


def exact_in_float32(k: int, act_bits: int) -> bool:
    """Whether Σ over `k` products q_x·q_w (|q_x| ≤ 2^(bits-1), |q_w| ≤ 8) is exact in float32 in any order."""
    return k * 2 ** (act_bits - 1) * -WEIGHT_QMIN <= FLOAT32_EXACT_INT


def code_matmul(q: torch.Tensor, codes: torch.Tensor, act_bits: int, group_size: int = 0) -> torch.Tensor:
    """Exact Σ q_x·q_w as float32: [T, N] (group_size 0) or [G, T, N] (one sum per group of inputs).

    `q`: activation codes (float) [T, M]; `codes`: weight codes [N, M] (any dtype holding them).
    """
    g = group_size or q.shape[-1]
    dtype = torch.float32 if exact_in_float32(g, act_bits) else torch.float64
    w = codes.to(dtype)
    if not group_size:
        return torch.matmul(q.to(dtype), w.t()).to(torch.float32)
    t, m = q.shape
    qg = q.to(dtype).reshape(t, m // g, g).transpose(0, 1)  # [G, T, g]
    wg = w.reshape(w.shape[0], m // g, g).permute(1, 2, 0)  # [G, g, N]
    return torch.bmm(qg, wg).to(torch.float32)


def apply_scales(acc: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """y = (acc · s_w) · s_x in float32; `acc` [T, N] or per group [G, T, N] (w_scale [N, G]), groups summed in order."""
    w_scale = w_scale.to(torch.float32)
    if acc.dim() == 2:
        y = acc * w_scale.reshape(1, -1)
    else:
        y = acc[0] * w_scale[:, 0]
        for i in range(1, acc.shape[0]):
            y = y + acc[i] * w_scale[:, i]
    return y * a_scale.to(torch.float32)


def qlinear_codes(
    x: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    act_bits: int,
    group_size: int = 0,
    rotation: tuple | None = None,
    hk: torch.Tensor | None = None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    """The w4a4/w4a8 linear, integer-exact: rotate, quantize per token, Σ codes, then scales. Float32 [..., N].

    The reference formulation every serving layout reproduces bit for bit (see above);
    `codes` int4 values [N, M], `w_scale` [N, 1] or [N, M/group_size].
    """
    lead = x.shape[:-1]
    xf = x.to(torch.float32).reshape(-1, x.shape[-1])
    if rotation is not None:
        xf = online_rotate(xf, rotation[0], rotation[1], hk, rotation[2] if len(rotation) > 2 else 1)
    q, s = quantize_activation(xf, act_bits, clip=act_clip)
    y = apply_scales(code_matmul(q, codes, act_bits, group_size), w_scale, s)
    return y.reshape(*lead, y.shape[-1])


def fake_quantize_activation(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    q, scale = quantize_activation(x, bits, clip=clip)
    return q * scale


def online_rotate(x: torch.Tensor, size: int, k: int, hk: torch.Tensor | None = None, blocks: int = 1) -> torch.Tensor:
    """The plugin's online rotation of the last dim: zero-pad N -> `size`, then T_size.

    With `blocks` = B > 1 (converter --tp-blocks) the rotation is block-diagonal: each
    of the B contiguous input blocks of N/B is padded to size/B and rotated by T_{size/B}
    (K = k), so a tensor-parallel rank holding whole blocks needs only its own slice.
    """
    n = x.shape[-1]
    if blocks > 1:
        x = x.reshape(*x.shape[:-1], blocks, n // blocks)
        n, size = n // blocks, size // blocks
    if size > n:
        x = torch.nn.functional.pad(x, (0, size - n))
    y = hadamard_transform(x, k, hk)
    return y.reshape(*y.shape[:-2], -1) if blocks > 1 else y


def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    act_bits: int | None,
    rotation: tuple[int, int] | None = None,
    hk: torch.Tensor | None = None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    """The qexpand linear in float32: rotate (pad + Hadamard), quantize activations, GEMM.

    `weight` is the dequantized float weight [out, M] (M = expanded input size).
    `rotation` is (M, K) or (M, K, blocks) for layers with an online rotation, else None.
    Returns float32 [..., out].
    """
    xf = x.to(torch.float32)
    if rotation is not None:
        xf = online_rotate(xf, rotation[0], rotation[1], hk, rotation[2] if len(rotation) > 2 else 1)
    if act_bits is not None:
        xf = fake_quantize_activation(xf, act_bits, act_clip)
    return torch.matmul(xf, weight.t())
