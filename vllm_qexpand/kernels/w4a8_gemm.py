"""int4-weight GEMM with int8 (W4A8) or packed int4 (W4A4) activation codes (Triton) + reference.

y[t, n] = a_scale[t] · Σ_k a[t, k] · w[n, k] · w_scale[n, ·]  (+ bias[n]), in the output dtype.

Weight layout (``repack_for_kernel``): uint8 [N, K/2], row n holding two value+8 codes per
byte, the low nibble for the even input. This is the checkpoint's int32 packing read as
little-endian bytes, so the repack is a contiguous byte view; it stays the single hook for
a later fragment-ordered layout. Rows are K-contiguous, the operand order int8 wgmma wants.

Activations: W4A8 takes int8 codes [T, K], in input order or (``a_planes=True``, K % 64 == 0)
in plane order (``hadamard_quant.to_planes``: per 64 inputs the 32 even ones, then the 32 odd
ones); W4A4 takes the ``hadamard_quant`` bits=4 output, uint8 [T, K/2] in the same nibble
layout as the weights.

Main loop: a [BN, BK/2] weight byte tile is split into its low and high nibble planes (values
0..15, inputs 2j and 2j + 1 of byte j) and each plane meets the matching activation plane in
an int8 ``tl.dot`` with int32 accumulation: W4A4 splits its activation bytes the same way, W4A8
reads the two halves of each plane-ordered 64-block; nothing is permuted. Only W4A8 with
input-order codes interleaves the weight planes back into k order. The zero points are
removed once, in the epilogue, with the per-token code sums Σa from ``hadamard_quant`` and the
per-channel weight code sums Σw from ``weight_code_sums``:

- W4A8: Σ a·(w+8) = Σ a·w + 8·Σa,
- W4A4: Σ (a+8)·(w+8) = Σ a·w + 8·Σa + 8·Σw + 64·K.

The unpack has two implementations behind the ``FAST`` constexpr with identical results:
an inline-PTX version working on four bytes per 32-bit register (GPU only) and a plain
``tl`` version (the interpreter cannot run inline asm).

Small M: ``split_k`` > 1 runs the K range in slices; each stores its exact int32 partial sums,
and the slice that arrives last at its tile's counter (an atomic on one int32 per tile, zeroed
per call) adds the partials in slice order and applies the epilogue: one GEMM launch plus the
counters' memset, and the same bits as without split-K.

Grouped weight scales (``group_size`` > 0, a multiple of BK): codes are made signed in
registers, each group's exact int32 sum is scaled by its scale and the groups are added in
order into a float32 accumulator (no epilogue correction, no split-K).

The configuration (``_CONFIGS``, ``default_config``) is chosen in one place,
:func:`plan_launches`, which both the launch and the static report (``kernels/aot.py``) use.
"""
from __future__ import annotations

import sys

import torch

from .. import quant
from . import HAS_TRITON, interpreting

# ----------------------------------------------------------------------------- weights / reference


def repack_for_kernel(weight_packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint int32 [N, K/8] (quant.pack_int4) -> kernel layout uint8 [N, K/2] (see module doc)."""
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"weight_packed must be int32 [N, K/8], got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("the byte view of the int32 packing assumes a little-endian host")
    return weight_packed.contiguous().view(torch.uint8)


def weight_code_sums(weight_packed: torch.Tensor) -> torch.Tensor:
    """Per output channel signed code sum Σ_k w[n, k] (int32 [N]), needed by the W4A4 epilogue.

    Runs on weight_packed's device, 1024 rows at a time (bounded temporary memory).
    """
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight_packed.device)
    k = weight_packed.shape[1] * quant.PACK
    parts = [
        (((rows.unsqueeze(-1) >> shifts) & 0xF).sum(dim=(1, 2)) - 8 * k).to(torch.int32)
        for rows in weight_packed.split(1024)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=weight_packed.device)


def w4_gemm_reference(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = 0,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference from signed activation codes (int8 [T, K]) and the checkpoint weight.

    Integer products are summed exactly (float64), then scaled: the kernels differ from
    this only by float32 rounding of the scaling.
    """
    w = quant.unpack_int4(weight_packed).to(torch.float64)
    a = a_codes.to(torch.float64)
    if group_size:
        g = group_size
        parts = torch.einsum("tgk,ngk->tng", a.reshape(a.shape[0], -1, g), w.reshape(w.shape[0], -1, g))
        y = (parts * weight_scale.to(torch.float64)).sum(-1)
    else:
        y = (a @ w.t()) * weight_scale.to(torch.float64).reshape(1, -1)
    y = y * a_scale.to(torch.float64).reshape(-1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------- configs

# (BM, BN, BK, num_warps, num_stages). Not timed on a GPU yet (benchmarks/kernels.py --tune
# sweeps); picked from the static report (benchmarks/kernel_sass.py: SASS instructions per
# warp per main-loop iteration, registers, spills for sm_90a), all without spills:
# - decode 16x64x128, 4 warps, 4 stages (memory-bound: deep prefetch): 106-108 (W4A4) and
#   88-89 (W4A8) instructions per iteration; 2 stages would issue 95 / 77;
# - small 64x128x64, 4 warps, 4 stages: 112 / 119, where 64x128x128 on 8 warps issued 226
#   (its A tile went through shared memory);
# - large 128x128x64, 8 warps, 2 stages: 81 / 88 (3 or 4 stages: 93 / 96, ring-buffer index
#   arithmetic); W4A4 needs 171 registers (one CTA per SM; capped at 128 it spills 112 B),
#   W4A8 118. 128x256 and 256x128 with BK = 128 need 209-228 registers and 156-211
#   instructions per iteration.
_CONFIGS = {
    "decode": (16, 64, 128, 4, 4),
    "small": (64, 128, 64, 4, 4),
    "large": (128, 128, 64, 8, 2),
}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def default_config(m: int, n: int, k: int, device: torch.device, group_size: int = 0, sm_count: int | None = None) -> dict:
    """Tile sizes, split-K and launch options for a GEMM of M tokens, N outputs, K inputs.

    ``sm_count`` overrides the device's (the static report plans for an H100/H200's 132).
    """
    sms = sm_count or _sm_count(device)
    key = "decode" if m <= 16 else "small" if m <= 64 else "large"
    bm, bn, bk, warps, stages = _CONFIGS[key]
    if group_size:
        bk = min(bk, group_size & -group_size)  # a power of two dividing the group
    split = 1
    tiles = -(-m // bm) * -(-n // bn)
    k_tiles = -(-k // bk)
    if not group_size and tiles < sms:
        # enough CTAs to fill the GPU, but keep >= 4 K tiles per slice
        split = max(1, min(2 * sms // tiles, k_tiles // 4, 16))
    return {"BM": bm, "BN": bn, "BK": bk, "split_k": split, "num_warps": warps, "num_stages": stages}


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _planes(p, FAST: tl.constexpr):
        """uint8 [R, C] of two value+8 nibbles -> (low, high) nibble planes, uint8 [R, C] each, 0..15."""
        if FAST:
            lo, hi = tl.inline_asm_elementwise(
                "and.b32 $0, $2, 0x0F0F0F0F;\n"
                "shr.b32 $1, $2, 4;\n"
                "and.b32 $1, $1, 0x0F0F0F0F;",
                "=r,=r,r",
                [p],
                dtype=(tl.uint8, tl.uint8),
                is_pure=True,
                pack=4,
            )
        else:
            lo = p & 0xF
            hi = p >> 4
        return lo, hi

    @triton.jit
    def _signed_planes(p, FAST: tl.constexpr):
        """uint8 [R, C] of two value+8 nibbles -> (low, high) planes as signed int8 [R, C], -8..7.

        FAST: per 32-bit word, (nibble ^ 8) then the sign bit (0x08) times 30 = 0xF0 fills the
        byte's top nibble (no carries between bytes): 5 instructions per plane per 4 bytes
        instead of a byte-wise subtract (PRMT-heavy)."""
        if FAST:
            lo, hi = tl.inline_asm_elementwise(
                "{\n.reg .b32 t;\n"
                "and.b32 $0, $2, 0x0F0F0F0F;\n"
                "xor.b32 $0, $0, 0x08080808;\n"
                "and.b32 t, $0, 0x08080808;\n"
                "mul.lo.u32 t, t, 30;\n"
                "or.b32 $0, $0, t;\n"
                "shr.b32 $1, $2, 4;\n"
                "and.b32 $1, $1, 0x0F0F0F0F;\n"
                "xor.b32 $1, $1, 0x08080808;\n"
                "and.b32 t, $1, 0x08080808;\n"
                "mul.lo.u32 t, t, 30;\n"
                "or.b32 $1, $1, t;\n}",
                "=r,=r,r",
                [p],
                dtype=(tl.int8, tl.int8),
                is_pure=True,
                pack=4,
            )
        else:
            lo = (p & 0xF).to(tl.int8) - 8
            hi = (p >> 4).to(tl.int8) - 8
        return lo, hi

    @triton.jit
    def _unpack(p, FAST: tl.constexpr):
        """uint8 [R, C] of two value+8 nibbles -> int8 [R, 2C] values 0..15 in k order (W4A8's weights)."""
        lo, hi = _planes(p, FAST)
        return tl.interleave(lo, hi).to(tl.int8)

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, M, N, K, as_ptr, asum_ptr, wsum_ptr, ws_ptr, stride_ws,
                  bias_ptr, out_ptr, stride_om, A_PACKED: tl.constexpr, GROUPED: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
        """Zero-point correction (per-channel path), scales, bias, cast and store."""
        mm = offs_m < M
        nm = offs_n < N
        if GROUPED:
            y = acc  # float32, weight scales already applied
        else:
            corr = 8 * tl.load(asum_ptr + offs_m, mask=mm, other=0)[:, None]
            if A_PACKED:
                corr = corr + 8 * tl.load(wsum_ptr + offs_n, mask=nm, other=0)[None, :] + 64 * K
            y = (acc - corr).to(tl.float32)
            y = y * tl.load(ws_ptr + offs_n * stride_ws, mask=nm, other=0.0)[None, :]
        y = y * tl.load(as_ptr + offs_m, mask=mm, other=0.0)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _k_step(acc, a_rows, w_rows, kh, K, KH, A_PACKED: tl.constexpr, SIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                BK: tl.constexpr, FAST: tl.constexpr, A_PLANES: tl.constexpr):
        """acc += the [BM, BK] x [BK, BN] product of the K tile starting at input 2·kh (int32).

        Value+8 codes (SIGNED = False; the epilogue removes the zero points) or signed ones
        (grouped scales). W4A4 multiplies the low nibble planes of A and W, then the high ones:
        both hold the same k pairing (byte j = inputs 2j, 2j+1), so no reordering to k order is
        needed. W4A8 interleaves the weight planes back to k order to meet the int8 activations.
        Without EVEN_K the K tail is masked with 0 bytes: a weight code of 0 is value+8 = 0, which
        zeroes the product whatever A holds, and A's padding is 0 too (W4A8: a = 0).
        """
        offs_h = kh + tl.arange(0, BK // 2)  # bytes of a packed row
        if EVEN_K:
            wp = tl.load(w_rows + offs_h[None, :])
        else:
            wp = tl.load(w_rows + offs_h[None, :], mask=(offs_h < KH)[None, :], other=0)
        if A_PACKED:
            if EVEN_K:
                ap = tl.load(a_rows + offs_h[None, :])
            else:
                ap = tl.load(a_rows + offs_h[None, :], mask=(offs_h < KH)[None, :], other=0)
            if SIGNED:
                a_lo, a_hi = _signed_planes(ap, FAST)
                w_lo, w_hi = _signed_planes(wp, FAST)
            else:
                a_lo, a_hi = _planes(ap, FAST)
                w_lo, w_hi = _planes(wp, FAST)
                a_lo = a_lo.to(tl.int8)
                a_hi = a_hi.to(tl.int8)
                w_lo = w_lo.to(tl.int8)
                w_hi = w_hi.to(tl.int8)
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        elif A_PLANES:
            # int8 codes in plane order (hadamard_quant planes=True): per 64 inputs the 32 even
            # ones, then the 32 odd ones, so each half meets one nibble plane of the weights
            c = tl.arange(0, BK // 2)
            offs_lo = 2 * kh + (c // 32) * 64 + c % 32
            if EVEN_K:
                a_lo = tl.load(a_rows + offs_lo[None, :])
                a_hi = tl.load(a_rows + (offs_lo + 32)[None, :])
            else:
                km = (2 * kh + 2 * c < K)[None, :]
                a_lo = tl.load(a_rows + offs_lo[None, :], mask=km, other=0)
                a_hi = tl.load(a_rows + (offs_lo + 32)[None, :], mask=km, other=0)
            if SIGNED:
                w_lo, w_hi = _signed_planes(wp, FAST)
            else:
                w_lo, w_hi = _planes(wp, FAST)
                w_lo = w_lo.to(tl.int8)
                w_hi = w_hi.to(tl.int8)
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        else:
            offs_k = 2 * kh + tl.arange(0, BK)
            if EVEN_K:
                a = tl.load(a_rows + offs_k[None, :])
            else:
                a = tl.load(a_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
            b = tl.trans(_unpack(wp, FAST))
            if SIGNED:
                b = b - 8
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def _w4_gemm_kernel(
        a_ptr, as_ptr, asum_ptr, w_ptr, wsum_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, flag_ptr,
        M, N, K, K_SLICE, stride_am, stride_wn, stride_ws, stride_om, SLICE_STRIDE,
        A_PACKED: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FAST: tl.constexpr,
        EVEN_K: tl.constexpr, A_PLANES: tl.constexpr,
    ):
        # grouped tile order along M for L2 reuse of the weight tiles
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        # rows past M / N read a valid row again (their outputs are never stored): no row masks
        a_rows = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        KH = K // 2

        k_lo = tl.program_id(1) * K_SLICE
        k_hi = tl.minimum(k_lo + K_SLICE, K)
        if GROUP > 0:
            # scales applied per whole group to its exact int32 sum, groups added in order
            # (the integer-exact formulation of quant.apply_scales); K % GROUP == 0, GROUP % BK == 0
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for g0 in range(0, K, GROUP):
                gacc = tl.zeros((BM, BN), dtype=tl.int32)
                for kk in tl.static_range(0, GROUP, BK):
                    gacc = _k_step(gacc, a_rows, w_rows, (g0 + kk) // 2, K, KH, A_PACKED, True, True, BK, FAST, A_PLANES)
                wsg = tl.load(ws_ptr + (offs_n % N) * stride_ws + g0 // GROUP)
                acc += gacc.to(tl.float32) * wsg[None, :]
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            # the loop runs over bytes of a packed row (K_SLICE and K are even: no signed division inside)
            for kh in range(k_lo // 2, k_hi // 2, BK // 2):
                acc = _k_step(acc, a_rows, w_rows, kh, K, KH, A_PACKED, False, EVEN_K, BK, FAST, A_PLANES)

        mm = offs_m < M
        nm = offs_n < N
        if SPLIT_K > 1:
            # in-kernel split-K reduction, no atomics on the data: each slice stores its exact int32
            # partial sums; the slice that arrives last (a per-tile counter) adds them in slice order
            # and runs the epilogue
            mask = mm[:, None] & nm[None, :]
            cell = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            # (the slice stride M·N comes from the host: M = 1 is a compile-time constant for the JIT)
            tl.store(part_ptr + tl.program_id(1) * SLICE_STRIDE + cell, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            arrived = tl.atomic_add(flag_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BM, BN), dtype=tl.int32)
                for sk in tl.static_range(SPLIT_K):
                    total += tl.load(part_ptr + sk * SLICE_STRIDE + cell, mask=mask, other=0,
                                     cache_modifier=".cg")  # other SMs wrote these: bypass L1
                _epilogue(total, offs_m, offs_n, M, N, K, as_ptr, asum_ptr, wsum_ptr, ws_ptr, stride_ws,
                          bias_ptr, out_ptr, stride_om, A_PACKED, False, HAS_BIAS)
        else:
            _epilogue(acc, offs_m, offs_n, M, N, K, as_ptr, asum_ptr, wsum_ptr, ws_ptr, stride_ws,
                      bias_ptr, out_ptr, stride_om, A_PACKED, GROUP > 0, HAS_BIAS)


def _fast_default(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting() and torch.version.hip is None


def plan_launches(
    a, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias, a_packed, config, out,
    sm_count: int | None = None, a_planes: bool = False,
):
    """(out, [(kernel, grid, args, kwargs), ...]): the launches a GEMM call makes, not run.

    The one place that chooses the configuration: :func:`_launch` runs these launches and the
    static report (``kernels/aot.py``) compiles exactly these, with the JIT's specialization
    of these arguments (meta tensors work: nothing is read here).
    """
    if not HAS_TRITON:
        raise RuntimeError("the W4 GEMM needs Triton")
    t = a.shape[0]
    k = a.shape[1] * (2 if a_packed else 1)
    n = weight.shape[0]
    if weight.dtype != torch.uint8 or weight.shape[1] * 2 != k:
        raise ValueError(f"weight must be uint8 [N, {k // 2}] (repack_for_kernel), got {weight.dtype} {tuple(weight.shape)}")
    if a.stride(-1) != 1:
        a = a.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    ws = weight_scale.to(torch.float32).reshape(n, -1)
    a_scale = a_scale.to(torch.float32).reshape(-1).contiguous()
    a_sum = a_sum.to(torch.int32).reshape(-1).contiguous() if a_sum is not None else None
    if a_scale.numel() != t or (a_sum is not None and a_sum.numel() != t):
        raise ValueError(f"a_scale / a_sum must have one entry per token ({t})")
    if group_size:
        if ws.shape[1] != k // group_size or k % group_size:
            raise ValueError(f"weight_scale {tuple(weight_scale.shape)} does not match K={k}, group_size={group_size}")
    elif ws.shape[1] != 1:
        raise ValueError(f"per-channel weight_scale must be [N, 1], got {tuple(weight_scale.shape)}")
    cfg = default_config(t, n, k, a.device, group_size, sm_count)
    cfg.update(config or {})
    bm, bn, bk, split = cfg["BM"], cfg["BN"], cfg["BK"], cfg["split_k"]
    if group_size and (group_size % bk or split != 1):
        raise ValueError(f"grouped scales need BK dividing group_size ({bk} vs {group_size}) and split_k = 1")
    if a_planes and (a_packed or k % 64 or bk % 64):
        raise ValueError(f"plane-ordered int8 activations need K and BK divisible by 64 (K={k}, BK={bk})")
    if out is None:
        out = torch.empty(t, n, dtype=out_dtype, device=a.device)
    elif out.shape != (t, n) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{t}, {n}] with unit stride on the last dim")
    if bias is not None:
        bias = bias.contiguous()
    if t == 0 or n == 0:
        return out, []
    k_tiles = -(-k // bk)
    split = max(1, min(split, k_tiles))
    k_slice = -(-k_tiles // split) * bk
    split = -(-k // k_slice)
    # split-K: int32 partials per slice (written before read: no zero fill) and one arrival counter per tile
    grid = (triton.cdiv(t, bm) * triton.cdiv(n, bn), split)
    part = torch.empty(split, t, n, dtype=torch.int32, device=a.device) if split > 1 else out
    flags = torch.zeros(grid[0], dtype=torch.int32, device=a.device) if split > 1 else a_scale
    a_sum = a_sum if a_sum is not None else ws
    weight_sums = weight_sums if weight_sums is not None else ws
    bias_arg = bias if bias is not None else ws
    fast = cfg.get("fast", _fast_default(a.device))
    launches = [(
        _w4_gemm_kernel, grid,
        (a, a_scale, a_sum, weight, weight_sums, ws, bias_arg, out, part, flags,
         t, n, k, k_slice, a.stride(0), weight.stride(0), ws.stride(0), out.stride(0), t * n),
        dict(A_PACKED=a_packed, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
             BM=bm, BN=bn, BK=bk, GROUP_M=8, FAST=fast, EVEN_K=k % bk == 0 and k_slice % bk == 0, A_PLANES=a_planes,
             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
             **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})),
    )]
    return out, launches


def _launch(
    a, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias, a_packed, config, out,
    a_planes=False,
):
    out, launches = plan_launches(
        a, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias, a_packed, config, out,
        a_planes=a_planes,
    )
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return out


def w4a8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_sum: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = 0,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    a_planes: bool = False,
) -> torch.Tensor:
    """W4A8: int8 codes a [T, K], a_scale f32 [T, 1], a_sum i32 [T], weight uint8 [N, K/2] -> [T, N].

    ``config`` overrides :func:`default_config` keys (BM, BN, BK, split_k, num_warps,
    num_stages, fast); ``out`` is a preallocated [T, N] output. ``a_planes``: ``a`` is in plane
    order (``hadamard_quant(..., planes=True)``, ``hadamard_quant.to_planes``; K % 64 == 0):
    each half of a 64-input block meets one nibble plane of the weights, with no permutes.
    """
    return _launch(a, a_scale, a_sum, weight, None, weight_scale, group_size, out_dtype, bias, False, config, out,
                   a_planes)


def w4a4_gemm(
    a_packed: torch.Tensor,
    a_scale: torch.Tensor,
    a_sum: torch.Tensor,
    weight: torch.Tensor,
    weight_sums: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = 0,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A4: packed codes a_packed uint8 [T, K/2] (hadamard_quant bits=4) and weight_sums i32 [N]."""
    return _launch(
        a_packed, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias, True, config, out
    )
