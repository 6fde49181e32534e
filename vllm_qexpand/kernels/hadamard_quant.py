"""Fused online rotation + per-token activation quantization (Triton), and its torch reference.

One program handles up to ``tokens`` consecutive tokens (a runtime trip count: every token
runs the same code whatever T is, so its result does not depend on the batch). For each token it

1. loads the N inputs into a 2-D tile, zero-padding to M (expansion),
2. applies T_M (``hadamard.hadamard_transform``) as two chained small matmuls,
3. computes the per-token scale absmax / qmax and one reciprocal, rounds half to even,
4. stores the codes (32-bit stores where a tile row holds whole words), the scale
   (float32 [T, 1]) and the code sum (int32 [T]).

At tensor parallelism > 1 the kernel runs twice: ``hadamard_absmax`` (the max only), then,
after the cross-rank max, ``hadamard_quant(..., amax=...)``.

Tile layout. Per rotation block of m = M/B values, m = K·P with P = P1·P2 (P2 a power
of two picked near sqrt(m)). The block is viewed as a (K·P1) × P2 row-major matrix V and
T_m(v) = A · V · Cᵀ / sqrt(m) with A = H_K ⊗ H_P1 and C = H_P2 (Sylvester matrices satisfy
H_P = H_P1 ⊗ H_P2). The tile has RB ≥ K·P1 rows per block (a power of two) and PB ≥ P2
columns (≥ 16, the smallest ``tl.dot`` size); the B blocks are stacked vertically and A
becomes the block-diagonal ``hrow`` ([ROWS, ROWS], zero padded). ``hcol`` is C padded to
[PB, PB]. Both are ±1 matrices built once per layer by :func:`hadamard_operands`. The
kernel walks V in chunks of RC rows (``_tile``: the whole tile for 128 x 128 tiles, else 32):
U_c = V_c · C, Y += A[:, c] · U_c, so only an [RC, PB] slice of the input and an [ROWS, RC]
slice of A are live at a time (A for K = 140 is 256 × 256); chunks made only of padding rows
are skipped at compile time.

Without a rotation (``k = 0``) the same tile just holds the row (zero-padded to M).

Codes. ``bits = 8``: int8 [T, M], in input order or (``planes=True``) in plane order
(:func:`to_planes`). ``bits = 4``: uint8 [T, M/2], two codes per byte stored as value+8, the
low nibble holding the even input: exactly the checkpoint weight packing read as bytes
(``quant.pack_int4(q).view(torch.uint8)``); or, with ``codes_int8``, one 4-bit code per int8.
The code sum is the signed sum of the codes (not of value+8) over the M outputs.

Precision. The first matmul sees the input dtype (bf16/fp16 products with ±1 are exact,
accumulation in fp32). On GPU the second splits the fp32 partial sums exactly into three bf16
parts and multiplies each by the ±1 matrix in bf16 (exact products, fp32 sums); fp32 inputs
use ``tf32x3`` and the interpreter plain fp32. The scale is IEEE (``div_rn``), the values are
multiplied by one reciprocal per token and rounded half to even, so codes match the torch
reference's ``round(y / scale)`` except where a value lies within float rounding of a .5
boundary.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import hadamard, quant
from . import HAS_TRITON, interpreting

# ----------------------------------------------------------------------------- reference


def hadamard_quant_reference(
    x: torch.Tensor, size: int, k: int, blocks: int = 1, bits: int = 8, amax_reduce=None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference: (codes, scale float32 [T, 1], code sums int32 [T]) for x [T, N].

    ``k = 0`` means no rotation (only zero-padding to ``size``). Codes as the kernel
    stores them: int8 [T, M] (bits 8) or packed uint8 [T, M/2] (bits 4).

    ``amax_reduce`` maps the per-token max|y| [T, 1] to the max to quantize with (at tensor
    parallelism > 1: the maximum over the ranks that hold the token's other slices); the
    GPU linear runs this function in that case, because the kernel takes its own slice's.
    ``clip``: the checkpoint's activation clip ratio (``quant.quantize_activation``).
    """
    xf = x.to(torch.float32)
    if k:
        y = quant.online_rotate(xf, size, k, None, blocks)
    else:
        y = torch.nn.functional.pad(xf, (0, size - xf.shape[-1]))
    amax = None if amax_reduce is None else amax_reduce(y.abs().amax(dim=-1, keepdim=True))
    q, scale = quant.quantize_activation(y, bits, amax=amax, clip=clip)
    sums = q.sum(dim=-1).to(torch.int32)
    codes = q.to(torch.int8)
    if bits == 4:  # = quant.pack_int4(codes).view(torch.uint8), computed on x's device
        u = (codes.to(torch.int16) + 8).reshape(codes.shape[0], -1, 2)
        codes = (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8)
    return codes, scale, sums


PLANE = 64  # inputs per block of the int8 plane order


def to_planes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [T, M] (M % 64 == 0) -> plane order: per 64 inputs, the 32 even ones then the 32 odd ones.

    The W4A8 GEMM's weight byte j holds inputs 2j (low nibble) and 2j + 1 (high): in plane order
    each half of a 64-block lines up with one nibble plane of 32 weight bytes.
    """
    t, m = codes.shape
    return codes.reshape(t, m // PLANE, PLANE // 2, 2).transpose(-1, -2).reshape(t, m)


def from_planes(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_planes`."""
    t, m = codes.shape
    return codes.reshape(t, m // PLANE, 2, PLANE // 2).transpose(-1, -2).reshape(t, m)


def unpack_activation_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [T, M/2] (value+8, low nibble = even input) -> int8 codes [T, M]."""
    u = packed.to(torch.int16)
    return torch.stack((u & 0xF, u >> 4), dim=-1).reshape(packed.shape[0], -1).sub(8).to(torch.int8)


# ----------------------------------------------------------------------------- plan


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Plan:
    """Tile geometry for one (size, k, blocks); see the module docstring."""

    size: int
    k: int
    blocks: int
    p2: int  # valid tile columns
    r: int  # valid rows per block
    rb: int  # rows per block (power of two)
    pb: int  # tile columns (power of two, >= 16)
    rows: int  # tile rows (power of two, >= 16 when rotating)

    @property
    def rotate(self) -> bool:
        return self.k > 0


@functools.lru_cache(maxsize=None)
def plan(size: int, k: int, blocks: int = 1) -> Plan:
    """Tile geometry for an output width ``size`` (M), Hadamard factor ``k`` (0: none), ``blocks``."""
    if blocks < 1 or size % blocks:
        raise ValueError(f"size {size} is not a multiple of blocks {blocks}")
    m = size // blocks
    if k == 0:
        if blocks != 1:
            raise ValueError("blocks > 1 needs a rotation (k >= 1)")
        p2 = min(64, max(16, _pow2(m)))
        r = -(-m // p2)
        return Plan(size, 0, 1, p2, r, _pow2(r), p2, _pow2(r))
    if k not in hadamard.KNOWN_K:
        raise ValueError(f"no Hadamard matrix of order {k}; known: {hadamard.KNOWN_K}")
    p = m // k
    if m % k or p & (p - 1):
        raise ValueError(f"block width {m} is not {k}·2^p")
    p2 = min(p, max(16, _pow2(math.isqrt(m - 1) + 1)))
    r = k * (p // p2)
    rb = _pow2(r)
    return Plan(size, k, blocks, p2, r, rb, max(16, p2), max(16, _pow2(blocks * rb)))


@functools.lru_cache(maxsize=64)
def _operands_cpu(size: int, k: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    pl = plan(size, k, blocks)
    p1 = pl.r // k
    a = torch.kron(hadamard.hadamard_k(k), hadamard.sylvester(p1))
    hrow = torch.zeros(pl.rows, pl.rows, dtype=torch.float64)
    for b in range(blocks):
        o = b * pl.rb
        hrow[o : o + pl.r, o : o + pl.r] = a
    hcol = torch.zeros(pl.pb, pl.pb, dtype=torch.float64)
    hcol[: pl.p2, : pl.p2] = hadamard.sylvester(pl.p2).t()
    return hrow.float(), hcol.float()


def hadamard_operands(
    size: int, k: int, blocks: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ±1 matrices (hrow [ROWS, ROWS], hcol [PB, PB]) for a rotation.

    ``dtype`` is the activation dtype: for bf16/fp16 (compiled kernels) hcol is built in it
    (±1 is exact), so the first matmul runs on the raw input, and hrow in bf16; otherwise (and
    in the interpreter) both are float32. Build once per layer (e.g. in
    ``process_weights_after_loading``), not inside CUDA-graph capture.
    """
    hrow, hcol = _operands_cpu(size, k, blocks)
    if dtype not in (torch.float16, torch.bfloat16) or interpreting():
        return hrow.to(device), hcol.to(device)  # the interpreter's bf16 dot is not usable
    # bf16 hrow: the second product runs as three exact bf16 MMAs (see the kernel)
    return hrow.to(device=device, dtype=torch.bfloat16), hcol.to(device=device, dtype=dtype)


def output_shapes(t: int, size: int, bits: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int]]:
    """Shapes of (codes, scale, sums) for ``t`` tokens."""
    return ((t, size) if bits == 8 else (t, size // 2)), (t, 1), (t,)


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _rint(x):
        # round half to even for |x| < 2^22 (exact IEEE adds; the interpreter has no libdevice)
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _pack_words(qi, ROWS: tl.constexpr, PB: tl.constexpr, BITS: tl.constexpr):
        """int32 codes [ROWS, PB] -> int32 words [ROWS, PB*BITS/32]: 4 bytes (bits 8) or 8 value+8
        nibbles (bits 4) per word, the first element in the lowest bits (little-endian bytes)."""
        if BITS == 8:
            b = qi & 0xFF
            e, o = tl.split(tl.reshape(b, (ROWS, PB // 4, 2, 2)))
            lo, hi = tl.split(e | (o << 8))
            return lo | (hi << 16)
        else:
            b = qi + 8
            e, o = tl.split(tl.reshape(b, (ROWS, PB // 8, 2, 2, 2)))
            e, o = tl.split(e | (o << 4))
            lo, hi = tl.split(e | (o << 8))
            return lo | (hi << 16)

    @triton.jit(do_not_specialize=["T", "TOK"])  # one compiled kernel for every T (no T = 1 variant)
    def _hadamard_quant_kernel(
        x_ptr, hrow_ptr, hcol_ptr, q_ptr, scale_ptr, sum_ptr, amax_ptr,
        T, TOK, N_BLK, M_BLK, stride_x, stride_q, inv_sqrt, clip,
        NB: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, P2: tl.constexpr, PB: tl.constexpr,
        ROWS: tl.constexpr, RC: tl.constexpr, ROTATE: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
        SPLIT3: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr, AMAX_MODE: tl.constexpr, FAST: tl.constexpr,
        PLANES: tl.constexpr, QBITS: tl.constexpr, CLIPPED: tl.constexpr,
    ):
        # AMAX_MODE 0: quantize with the token's own max; 1: only write that max to amax_ptr (the
        # first pass at TP > 1); 2: quantize with amax_ptr's value (the max over the ranks)
        # QBITS: the quantization levels; BITS: how the codes are stored (int4 codes may be stored as int8)
        # CLIPPED: the per-token max is scaled by `clip` (< 1, activations.clip) before the scale is taken
        QMAX: tl.constexpr = 2 ** (QBITS - 1) - 1
        i = tl.arange(0, ROWS)[:, None]
        j = tl.arange(0, PB)[None, :]
        blk = i // RB
        r = i % RB
        f = r * P2 + j  # index inside the rotation block
        live = (blk < NB) & (r < R) & (j < P2)
        in_mask = live & (f < N_BLK)
        out_mask = live & (f < M_BLK)
        src = blk * N_BLK + f
        dst = blk * M_BLK + f
        if PLANES:  # bits 8 in plane order: per 64 inputs, the 32 even ones, then the 32 odd ones
            dst = (dst // 64) * 64 + (dst % 2) * 32 + (dst % 64) // 2
            if WIDE:  # P2 % 64 == 0: a 64-block lies in one tile row; 8 words of evens, 8 of odds
                jq = tl.arange(0, PB // 8)[None, :]  # word of a plane across the row's 64-blocks
                wbase = (blk * M_BLK + r * P2) // 4 + (jq // 8) * 16 + jq % 8
                maskq = (blk < NB) & (r < R) & (jq * 8 < P2) & (r * P2 + jq * 8 < M_BLK)
                qw_ptr = q_ptr.to(tl.pointer_type(tl.int32))
        elif WIDE:  # 32-bit stores: PB * BITS / 32 words per tile row
            WPR: tl.constexpr = PB * BITS // 32
            jw = tl.arange(0, WPR)[None, :]
            EPW: tl.constexpr = 32 // BITS  # elements per word
            dstw = (blk * M_BLK + r * P2 + jw * EPW) // EPW
            maskw = (blk < NB) & (r < R) & (jw * EPW < P2) & (r * P2 + jw * EPW < M_BLK)
            qw_ptr = q_ptr.to(tl.pointer_type(tl.int32))
        elif BITS == 4:
            j2 = tl.arange(0, PB // 2)[None, :]
            f2 = r * P2 + 2 * j2
            out_mask2 = (blk < NB) & (r < R) & (j2 < P2 // 2) & (f2 < M_BLK)
            dst2 = (blk * M_BLK + f2) // 2
        if ROTATE:
            c = tl.load(hcol_ptr + tl.arange(0, PB)[:, None] * PB + j)
            rc = tl.arange(0, RC)[:, None]
            rc_cols = tl.arange(0, RC)[None, :]
        t0 = tl.program_id(0) * TOK
        # a runtime trip count: every token runs the same code whatever T and TOK are, so its
        # codes do not depend on the batch it came in (issue 17)
        for tt in range(0, tl.minimum(TOK, T - t0)):
            t = t0 + tt
            t64 = t.to(tl.int64)
            if ROTATE:
                # y = A · (V · C), the second product split over RC-row chunks of V so that
                # only an [RC, PB] input slice and an [ROWS, RC] slice of A are live at a time
                y = tl.zeros((ROWS, PB), dtype=tl.float32)
                for c0 in tl.static_range(0, ROWS, RC):
                    if RC > RB or c0 % RB < R:  # skip chunks made only of padding rows
                        if RC == ROWS:  # one chunk: the whole tile (offsets and mask set up once)
                            v = tl.load(x_ptr + t64 * stride_x + src, mask=in_mask, other=0.0)
                        else:
                            ic = c0 + rc
                            blk_c = ic // RB
                            r_c = ic % RB
                            f_c = r_c * P2 + j
                            m_c = (blk_c < NB) & (r_c < R) & (j < P2) & (f_c < N_BLK)
                            v = tl.load(x_ptr + t64 * stride_x + blk_c * N_BLK + f_c, mask=m_c, other=0.0)
                        a = tl.load(hrow_ptr + i * ROWS + c0 + rc_cols)
                        if DOT_F32:
                            u = tl.dot(v.to(tl.float32), c, input_precision=PREC)
                            y = tl.dot(a, u, y, input_precision=PREC)
                        else:
                            u = tl.dot(v, c)  # ±1 x bf16/fp16: exact products, fp32 sums
                            if SPLIT3:
                                # u = hi + mid + lo exactly (3 x 8 significant bits = fp32's 24): hi and
                                # mid are u and its remainder truncated to their top 16 bits (a bf16
                                # held in an fp32: a mask, then the bf16 is the high half), both
                                # subtractions are exact, and lo has <= 8 significant bits left.
                                # Each part times the ±1 row is exact in a bf16 MMA.
                                hi32 = (u.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
                                rem = u - hi32
                                mid32 = (rem.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
                                u_hi = hi32.to(tl.bfloat16)  # exact: already a bf16 value
                                u_mid = mid32.to(tl.bfloat16)
                                u_lo = (rem - mid32).to(tl.bfloat16)
                                y = tl.dot(a, u_hi, y)
                                y = tl.dot(a, u_mid, y)
                                y = tl.dot(a, u_lo, y)
                            else:
                                y = tl.dot(a, u, y, input_precision=PREC)
                # y is the unnormalised transform: max|y / sqrt(m)| = max|y| * (1 / sqrt(m)) exactly
                # (rounding is monotone), and 1 / sqrt(m) is folded into the per-token reciprocal
                norm = inv_sqrt
            else:
                v = tl.load(x_ptr + t64 * stride_x + src, mask=in_mask, other=0.0)
                y = v.to(tl.float32)
                norm = 1.0
            amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0) * norm
            if AMAX_MODE == 1:
                tl.store(amax_ptr + t, amax)
            else:
                if AMAX_MODE == 2:
                    amax = tl.load(amax_ptr + t)
                if CLIPPED:
                    amax = amax * clip  # float32 product, as quant.quantize_activation
                scale = tl.math.div_rn(amax, amax * 0.0 + QMAX)
                scale = tl.where(scale > 0.0, scale, 1.0)
                inv = tl.math.div_rn(scale * 0.0 + 1.0, scale) * norm  # one reciprocal per token
                if FAST:  # cvt.rni: round half to even straight to int32 (one instruction)
                    qi = libdevice.float2int_rn(y * inv)
                else:  # the interpreter has no libdevice
                    qi = _rint(y * inv).to(tl.int32)
                if AMAX_MODE == 2 or CLIPPED:
                    # |y| <= own max <= the given max keeps |y·inv| <= QMAX (+ rounding), so only a
                    # given max or a clipped one needs the clamp (a smaller one must not overflow the nibbles)
                    qi = tl.minimum(tl.maximum(qi, -QMAX - 1), QMAX)
                # no mask needed: padding cells of the tile hold 0 (masked loads, zero-padded hrow /
                # hcol), so their codes are 0 and add nothing to the sum
                tl.store(scale_ptr + t, scale)
                tl.store(sum_ptr + t, tl.sum(tl.sum(qi, axis=1), axis=0))
                if PLANES and WIDE:
                    # [ROWS, PB] -> even / odd planes [ROWS, PB/2] (element 2i / 2i + 1 of each pair),
                    # each packed 4 per word: 8 words per 64-block per plane
                    ev, od = tl.split(tl.reshape(qi, (ROWS, PB // 2, 2)))
                    row0 = qw_ptr + (t64 * stride_q) // 4
                    tl.store(row0 + wbase, _pack_words(ev, ROWS, PB // 2, 8), mask=maskq)
                    tl.store(row0 + wbase + 8, _pack_words(od, ROWS, PB // 2, 8), mask=maskq)
                elif WIDE:
                    tl.store(qw_ptr + (t64 * stride_q) // 4 + dstw,
                             _pack_words(qi, ROWS, PB, BITS), mask=maskw)
                elif BITS == 8:
                    tl.store(q_ptr + t64 * stride_q + dst, qi.to(tl.int8), mask=out_mask)
                else:
                    lo, hi = tl.split(tl.reshape(qi + 8, (ROWS, PB // 2, 2)))
                    tl.store(q_ptr + t64 * stride_q + dst2, (lo | (hi << 4)).to(tl.uint8), mask=out_mask2)


def _tokens_per_program(t: int) -> int:
    return 1 if t <= 1024 else 4  # untuned: amortises the matrix loads at prefill sizes


def _tile(pl: Plan) -> tuple[int, int]:
    """(RC, num_warps): rows per chunk of the second product and warps, from the static report
    (benchmarks/kernel_sass.py; fewest SASS instructions per token summed over the warps, no
    spills). A 128 x 128 tile (14336, 15360, 10240) runs as one chunk on 8 warps: ~9,300-9,800
    warp-instructions per token where 32-row chunks on 16 warps took ~15,000-18,000. Elsewhere
    32-row chunks stay better (4096, 8192, 8960) or the only layout without spills (17920)."""
    cells = pl.rows * pl.pb
    if cells <= 2048:
        return min(pl.rows, 32), 4
    if pl.rows == 128 and pl.pb == 128:
        return 128, 8
    return min(pl.rows, 32), 8 if cells <= 8192 else 16


def _num_warps(pl: Plan) -> int:
    return _tile(pl)[1]


def _chunk_rows(pl: Plan) -> int:
    return _tile(pl)[0]


def plan_launch(
    x: torch.Tensor,
    size: int,
    k: int,
    blocks: int = 1,
    bits: int = 8,
    hrow: torch.Tensor | None = None,
    hcol: torch.Tensor | None = None,
    *,
    tokens_per_program: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    amax: torch.Tensor | None = None,
    amax_only: bool = False,
    tile: dict | None = None,
    planes: bool = False,
    codes_int8: bool = False,
    clip: float = 1.0,
):
    """((codes, scale, sums) or (amax,), [(kernel, grid, args, kwargs)]): what :func:`hadamard_quant` launches.

    ``tile`` overrides ``RC`` (rows per chunk of the second product) / ``num_warps`` (static
    report experiments).

    The one place that chooses the configuration; ``kernels/aot.py`` compiles these launches
    (meta tensors work: nothing is read here).
    """
    if not HAS_TRITON:
        raise RuntimeError("hadamard_quant needs Triton")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if not 0 < clip <= 1:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, N], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, n = x.shape
    pl = plan(size, k, blocks)
    if n % blocks or n // blocks > size // blocks:
        raise ValueError(f"input width {n} does not fit size {size} in {blocks} blocks")
    if bits == 4 and (pl.p2 % 2 or size % 2):
        raise ValueError(f"int4 packing needs an even tile width; size {size}, k {k} gives {pl.p2}")
    qbits = bits
    if codes_int8:  # 4-bit levels stored one per int8 (what the W4A8 GEMM multiplies)
        bits = 8
    if planes and (bits != 8 or size % PLANE):
        raise ValueError(f"plane order is for int8 codes and sizes divisible by {PLANE}; got bits {bits}, size {size}")
    split3 = False
    if pl.rotate:
        if hrow is None or hcol is None:
            hrow, hcol = hadamard_operands(size, k, blocks, x.dtype, x.device)
        if hcol.dtype != torch.float32 and (hcol.dtype != x.dtype or interpreting()):
            hcol = hcol.float()
        split3 = hcol.dtype != torch.float32 and hrow.dtype == torch.bfloat16
        if not split3:
            hrow = hrow.float()
    else:
        hrow = hcol = x  # unused by the kernel
    shapes = output_shapes(t, size, bits)
    if amax_only:
        outs = (torch.empty(shapes[1], dtype=torch.float32, device=x.device),)
        codes, scale, sums = x, outs[0], outs[0]  # unused by the kernel in this mode
    elif out is None:
        codes = torch.empty(shapes[0], dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
        scale = torch.empty(shapes[1], dtype=torch.float32, device=x.device)
        sums = torch.empty(shapes[2], dtype=torch.int32, device=x.device)
        outs = (codes, scale, sums)
    else:
        codes, scale, sums = outs = out
    if amax is not None:
        amax = amax.to(torch.float32).reshape(-1).contiguous()
        if amax.numel() != t:
            raise ValueError(f"amax must have one entry per token ({t}), got {amax.numel()}")
    if t == 0:
        return outs, []
    mode = 1 if amax_only else 2 if amax is not None else 0
    amax_arg = outs[0] if amax_only else amax if amax is not None else scale
    # 32-bit stores when every word lies inside one tile row and rows start on 4-byte bounds
    epw = 32 // bits
    wide = (not amax_only and pl.p2 % epw == 0 and (size // blocks) % epw == 0 and codes.stride(0) % 4 == 0
            and pl.pb % epw == 0)
    if planes:  # whole 64-blocks per tile row
        wide = wide and pl.p2 % PLANE == 0 and (size // blocks) % PLANE == 0
    tokens = tokens_per_program or _tokens_per_program(t)
    launch = (
        _hadamard_quant_kernel, (triton.cdiv(t, tokens),),
        (x, hrow, hcol, codes, scale, sums, amax_arg,
         t, tokens, n // blocks, size // blocks, x.stride(0), codes.stride(0), float(1.0 / math.sqrt(size // blocks)),
         float(clip)),
        dict(NB=pl.blocks, R=pl.r, RB=pl.rb, P2=pl.p2, PB=pl.pb, ROWS=pl.rows, RC=(tile or {}).get("RC", _chunk_rows(pl)),
             ROTATE=pl.rotate, DOT_F32=hcol.dtype == torch.float32,
             PREC="ieee" if interpreting() else "tf32x3", SPLIT3=split3,
             BITS=bits, WIDE=wide, AMAX_MODE=mode, FAST=not interpreting() and torch.version.hip is None,
             PLANES=planes, QBITS=qbits, CLIPPED=not amax_only and clip != 1.0,
             num_warps=(tile or {}).get("num_warps", _num_warps(pl)),
             num_stages=1),  # pipelining the token loop multi-buffers the chunks: > 228 KiB smem at K = 140
    )
    return outs, [launch]


def hadamard_quant(
    x: torch.Tensor,
    size: int,
    k: int,
    blocks: int = 1,
    bits: int = 8,
    hrow: torch.Tensor | None = None,
    hcol: torch.Tensor | None = None,
    *,
    tokens_per_program: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    amax: torch.Tensor | None = None,
    planes: bool = False,
    codes_int8: bool = False,
    clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launch: x [T, N] -> (codes, scale float32 [T, 1], sums int32 [T]); see module doc.

    ``k = 0``: quantize only (pad to ``size``). ``hrow``/``hcol`` default to
    :func:`hadamard_operands` (cached per rotation; pass them explicitly on hot paths).
    ``out`` are preallocated outputs (every element is written). ``amax`` (float32 [T, 1]):
    quantize with this per-token max|y| instead of the token's own (tensor parallelism: the max
    over the ranks, from :func:`hadamard_absmax` on each rank). ``planes`` (bits 8, size % 64
    == 0): codes in plane order (:func:`to_planes`), the order the W4A8 GEMM's
    ``a_planes=True`` multiplies without permuting its weights. ``codes_int8`` (bits 4): the
    4-bit codes stored one per int8 [T, M] (the W4A8 GEMM's input; same values, twice the bytes).
    ``clip`` (0, 1]: the checkpoint's activation clip ratio; the scale is (max · clip) / qmax.
    """
    outs, launches = plan_launch(x, size, k, blocks, bits, hrow, hcol, tokens_per_program=tokens_per_program,
                                 out=out, amax=amax, planes=planes, codes_int8=codes_int8, clip=clip)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return outs


def hadamard_absmax(
    x: torch.Tensor, size: int, k: int, blocks: int = 1, hrow: torch.Tensor | None = None,
    hcol: torch.Tensor | None = None, *, tokens_per_program: int | None = None,
) -> torch.Tensor:
    """Per-token max|T_M(pad(x))| (float32 [T, 1]) computed as :func:`hadamard_quant` computes it.

    The first pass at tensor parallelism > 1: all-gather + max it across the ranks, then pass
    the result as ``hadamard_quant(..., amax=...)`` (same rotation, recomputed, same bits).
    """
    outs, launches = plan_launch(x, size, k, blocks, 8, hrow, hcol, tokens_per_program=tokens_per_program,
                                 amax_only=True)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return outs[0]
