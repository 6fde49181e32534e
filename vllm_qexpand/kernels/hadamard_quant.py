"""Fused online rotation + per-token activation quantization (Triton), and its torch reference.

One program handles ``tokens`` consecutive tokens. For each token it

1. loads the N inputs into a 2-D tile, zero-padding to M (expansion),
2. applies T_M (``hadamard.hadamard_transform``) as two chained small matmuls,
3. computes the per-token scale absmax / qmax, rounds half to even, clamps,
4. stores the codes, the scale (float32 [T, 1]) and the code sum (int32 [T]).

Tile layout. Per rotation block of m = M/B values, m = K·P with P = P1·P2 (P2 a power
of two picked near sqrt(m)). The block is viewed as a (K·P1) × P2 row-major matrix V and
T_m(v) = A · V · Cᵀ / sqrt(m) with A = H_K ⊗ H_P1 and C = H_P2 (Sylvester matrices satisfy
H_P = H_P1 ⊗ H_P2). The tile has RB ≥ K·P1 rows per block (a power of two) and PB ≥ P2
columns (≥ 16, the smallest ``tl.dot`` size); the B blocks are stacked vertically and A
becomes the block-diagonal ``hrow`` ([ROWS, ROWS], zero padded). ``hcol`` is C padded to
[PB, PB]. Both are ±1 matrices built once per layer by :func:`hadamard_operands`. The
kernel walks V in chunks of RC = min(ROWS, 32) rows: U_c = V_c · C, Y += A[:, c] · U_c, so only an
[RC, PB] slice of the input and an [ROWS, RC] slice of A are live at a time (A for K = 140
is 256 × 256); chunks made only of padding rows are skipped at compile time.

Without a rotation (``k = 0``) the same tile just holds the row (zero-padded to M).

Codes. ``bits = 8``: int8 [T, M]. ``bits = 4``: uint8 [T, M/2], two codes per byte stored
as value+8, the low nibble holding the even input: exactly the checkpoint weight packing
read as bytes (``quant.pack_int4(q).view(torch.uint8)``). The code sum is the signed sum
of the codes (not of value+8) over the M outputs.

Precision. The first matmul sees the input dtype (bf16/fp16 products with ±1 are exact,
accumulation in fp32); the second multiplies fp32 partial sums, run as ``tf32x3`` on GPU
(about 22 mantissa bits, as ±1 is exact in tf32) and as plain fp32 in the interpreter.
Division is IEEE (``div_rn``) and rounding is round-half-to-even, so codes match the
torch reference except where a value lies within float rounding of a .5 boundary.
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
    x: torch.Tensor, size: int, k: int, blocks: int = 1, bits: int = 8, amax_reduce=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference: (codes, scale float32 [T, 1], code sums int32 [T]) for x [T, N].

    ``k = 0`` means no rotation (only zero-padding to ``size``). Codes as the kernel
    stores them: int8 [T, M] (bits 8) or packed uint8 [T, M/2] (bits 4).

    ``amax_reduce`` maps the per-token max|y| [T, 1] to the max to quantize with (at tensor
    parallelism > 1: the maximum over the ranks that hold the token's other slices); the
    GPU linear runs this function in that case, because the kernel takes its own slice's.
    """
    xf = x.to(torch.float32)
    if k:
        y = quant.online_rotate(xf, size, k, None, blocks)
    else:
        y = torch.nn.functional.pad(xf, (0, size - xf.shape[-1]))
    amax = None if amax_reduce is None else amax_reduce(y.abs().amax(dim=-1, keepdim=True))
    q, scale = quant.quantize_activation(y, bits, amax=amax)
    sums = q.sum(dim=-1).to(torch.int32)
    codes = q.to(torch.int8)
    if bits == 4:
        codes = quant.pack_int4(codes).view(torch.uint8)
    return codes, scale, sums


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
    """The ±1 matrices (hrow float32 [ROWS, ROWS], hcol [PB, PB]) for a rotation.

    ``dtype`` is the activation dtype: hcol is built in it (bf16/fp16 hold ±1 exactly), so
    the first matmul runs on the raw input. Build once per layer (e.g. in
    ``process_weights_after_loading``), not inside CUDA-graph capture.
    """
    hrow, hcol = _operands_cpu(size, k, blocks)
    if dtype not in (torch.float16, torch.bfloat16) or interpreting():
        dtype = torch.float32  # the interpreter's bf16 dot is not usable
    return hrow.to(device), hcol.to(device=device, dtype=dtype)


def output_shapes(t: int, size: int, bits: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int]]:
    """Shapes of (codes, scale, sums) for ``t`` tokens."""
    return ((t, size) if bits == 8 else (t, size // 2)), (t, 1), (t,)


# ----------------------------------------------------------------------------- kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rint(x):
        # round half to even for |x| < 2^22 (exact IEEE adds; the interpreter has no libdevice)
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _hadamard_quant_kernel(
        x_ptr, hrow_ptr, hcol_ptr, q_ptr, scale_ptr, sum_ptr,
        T, N_BLK, M_BLK, stride_x, stride_q, inv_sqrt,
        NB: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, P2: tl.constexpr, PB: tl.constexpr,
        ROWS: tl.constexpr, RC: tl.constexpr, ROTATE: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
        BITS: tl.constexpr, TOKENS: tl.constexpr,
    ):
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
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
        if BITS == 4:
            j2 = tl.arange(0, PB // 2)[None, :]
            f2 = r * P2 + 2 * j2
            out_mask2 = (blk < NB) & (r < R) & (j2 < P2 // 2) & (f2 < M_BLK)
            dst2 = (blk * M_BLK + f2) // 2
        if ROTATE:
            c = tl.load(hcol_ptr + tl.arange(0, PB)[:, None] * PB + j)
            rc = tl.arange(0, RC)[:, None]
            rc_cols = tl.arange(0, RC)[None, :]
        for tt in range(TOKENS):
            t = tl.program_id(0) * TOKENS + tt
            ok = t < T
            ok2 = (i * 0 + t) < T  # block-shaped: the interpreter mis-types scalar & block masks
            t64 = t.to(tl.int64)
            if ROTATE:
                # y = A · (V · C), the second product split over RC-row chunks of V so that
                # only an [RC, PB] input slice and an [ROWS, RC] slice of A are live at a time
                y = tl.zeros((ROWS, PB), dtype=tl.float32)
                for c0 in tl.static_range(0, ROWS, RC):
                    if RC > RB or c0 % RB < R:  # skip chunks made only of padding rows
                        ic = c0 + rc
                        blk_c = ic // RB
                        r_c = ic % RB
                        f_c = r_c * P2 + j
                        m_c = (blk_c < NB) & (r_c < R) & (j < P2) & (f_c < N_BLK) & ((rc * 0 + t) < T)
                        v = tl.load(x_ptr + t64 * stride_x + blk_c * N_BLK + f_c, mask=m_c, other=0.0)
                        if DOT_F32:
                            u = tl.dot(v.to(tl.float32), c, input_precision=PREC)
                        else:
                            u = tl.dot(v, c)
                        a = tl.load(hrow_ptr + i * ROWS + c0 + rc_cols)
                        y = tl.dot(a, u, y, input_precision=PREC)
                y = y * inv_sqrt
            else:
                v = tl.load(x_ptr + t64 * stride_x + src, mask=in_mask & ok2, other=0.0)
                y = v.to(tl.float32)
            amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
            scale = tl.math.div_rn(amax, amax * 0.0 + QMAX)
            scale = tl.where(scale > 0.0, scale, 1.0)
            q = _rint(tl.math.div_rn(y, scale + tl.zeros_like(y)))
            q = tl.minimum(tl.maximum(q, -QMAX - 1.0), 1.0 * QMAX)
            qi = tl.where(out_mask, q.to(tl.int32), 0)
            tl.store(scale_ptr + t, scale, mask=ok)
            tl.store(sum_ptr + t, tl.sum(tl.sum(qi, axis=1), axis=0), mask=ok)
            if BITS == 8:
                tl.store(q_ptr + t64 * stride_q + dst, qi.to(tl.int8), mask=out_mask & ok2)
            else:
                lo, hi = tl.split(tl.reshape(qi + 8, (ROWS, PB // 2, 2)))
                tl.store(q_ptr + t64 * stride_q + dst2, (lo | (hi << 4)).to(tl.uint8), mask=out_mask2 & ok2)


def _tokens_per_program(t: int) -> int:
    return 1 if t <= 1024 else 4  # untuned: amortises the matrix loads at prefill sizes


def _num_warps(pl: Plan) -> int:
    cells = pl.rows * pl.pb
    return 4 if cells <= 2048 else 8 if cells <= 8192 else 16


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((codes, scale, sums), [(kernel, grid, args, kwargs)]): what :func:`hadamard_quant` launches.

    The one place that chooses the configuration; ``kernels/aot.py`` compiles these launches
    (meta tensors work: nothing is read here).
    """
    if not HAS_TRITON:
        raise RuntimeError("hadamard_quant needs Triton")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
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
    if pl.rotate:
        if hrow is None or hcol is None:
            hrow, hcol = hadamard_operands(size, k, blocks, x.dtype, x.device)
        hrow = hrow.float()
        if hcol.dtype != torch.float32 and (hcol.dtype != x.dtype or interpreting()):
            hcol = hcol.float()
    else:
        hrow = hcol = x  # unused by the kernel
    shapes = output_shapes(t, size, bits)
    if out is None:
        codes = torch.empty(shapes[0], dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
        scale = torch.empty(shapes[1], dtype=torch.float32, device=x.device)
        sums = torch.empty(shapes[2], dtype=torch.int32, device=x.device)
    else:
        codes, scale, sums = out
    if t == 0:
        return (codes, scale, sums), []
    tokens = tokens_per_program or _tokens_per_program(t)
    launch = (
        _hadamard_quant_kernel, (triton.cdiv(t, tokens),),
        (x, hrow, hcol, codes, scale, sums,
         t, n // blocks, size // blocks, x.stride(0), codes.stride(0), float(1.0 / math.sqrt(size // blocks))),
        dict(NB=pl.blocks, R=pl.r, RB=pl.rb, P2=pl.p2, PB=pl.pb, ROWS=pl.rows, RC=min(pl.rows, 32),
             ROTATE=pl.rotate, DOT_F32=hcol.dtype == torch.float32,
             PREC="ieee" if interpreting() else "tf32x3",
             BITS=bits, TOKENS=tokens, num_warps=_num_warps(pl),
             num_stages=1),  # pipelining the token loop multi-buffers the chunks: > 228 KiB smem at K = 140
    )
    return (codes, scale, sums), [launch]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launch: x [T, N] -> (codes, scale float32 [T, 1], sums int32 [T]); see module doc.

    ``k = 0``: quantize only (pad to ``size``). ``hrow``/``hcol`` default to
    :func:`hadamard_operands` (cached per rotation; pass them explicitly on hot paths).
    ``out`` are preallocated outputs (every element is written).
    """
    outs, launches = plan_launch(x, size, k, blocks, bits, hrow, hcol, tokens_per_program=tokens_per_program, out=out)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return outs
