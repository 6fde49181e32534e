"""``torch.ops.qexpand.*`` custom ops over the Triton kernels, and the GPU linear entry point.

Ops (registered with ``torch.library.custom_op`` when Triton is importable, so they do not
depend on any vLLM version; each has a fake impl for torch.compile / CUDA-graph tracing):

- ``qexpand::hadamard_quant(Tensor x, Tensor hrow, Tensor hcol, int size, int k, int blocks,
  int bits, bool planes=False, bool codes_int8=False) -> (Tensor codes, Tensor scale, Tensor sums)``
  (``planes``: int8 codes in the plane order ``w4a8_gemm(..., a_planes=True)`` multiplies without
  permutes; ``codes_int8``: bits-4 codes stored one per int8)
- ``qexpand::hadamard_absmax(Tensor x, Tensor hrow, Tensor hcol, int size, int k, int blocks)
  -> Tensor amax`` and ``qexpand::hadamard_quant_amax(Tensor x, Tensor hrow, Tensor hcol,
  Tensor amax, int size, int k, int blocks, int bits, bool planes=False, bool codes_int8=False) -> (codes, scale, sums)``: the two passes
  at tensor parallelism > 1 (the per-token max is reduced across ranks in between)
- ``qexpand::w4a8_gemm(Tensor a, Tensor a_scale, Tensor a_sum, Tensor weight,
  Tensor weight_scale, int group_size, ScalarType out_dtype, Tensor? bias, bool a_planes=False) -> Tensor``
- ``qexpand::w4a4_gemm(Tensor a, Tensor a_scale, Tensor a_sum, Tensor weight,
  Tensor weight_sums, Tensor weight_scale, int group_size, ScalarType out_dtype,
  Tensor? bias) -> Tensor``

They are registered for CUDA; when the Triton interpreter is on (TRITON_INTERPRET=1 at
import) also for CPU, which is how the CPU tests run them.

The plugin calls :func:`prepare_weights` once per layer (``process_weights_after_loading``)
and :func:`qexpand_linear_gpu` in ``apply`` with those tensors as keyword arguments.
"""
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import HAS_TRITON, interpreting
from .hadamard_quant import hadamard_operands, output_shapes
from .w4a8_gemm import repack_for_kernel, weight_code_sums

OPS_REGISTERED = False

# W4A4 activation codes between the two kernels: "int4" (packed, the W4A4 GEMM) or "int8" (the same
# 4-bit codes one per byte, in plane order, through the W4A8 GEMM: 118 instead of 171 registers on
# the large tile, twice the activation bytes; bit-identical output). Untimed: the first GPU run decides.
W4A4_CODES = os.environ.get("VLLM_QEXPAND_W4A4_CODES", "int4")

_OPERANDS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def rotation_operands(
    rotation: Tuple[int, int, int], act_dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hrow, hcol) for a rotation (size, k, blocks), built once per (rotation, dtype, device)."""
    key = (tuple(rotation), act_dtype, torch.device(device))
    if key not in _OPERANDS:
        _OPERANDS[key] = hadamard_operands(rotation[0], rotation[1], rotation[2], act_dtype, device)
    return _OPERANDS[key]


def prepare_weights(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    rotation: Optional[Tuple[int, int, int]] = None,
    act_dtype: torch.dtype = torch.bfloat16,
) -> Dict[str, torch.Tensor]:
    """Load-time tensors for :func:`qexpand_linear_gpu` (call in ``process_weights_after_loading``).

    Returns, on weight_packed's device: ``weight`` (uint8 [out, M/2], :func:`repack_for_kernel`),
    ``weight_scale`` (float32), ``weight_sums`` (int32 [out], used by W4A4) and, with a
    rotation (size, k, blocks), ``hrow`` / ``hcol`` (its ±1 matrices). Pass them as keyword
    arguments: ``qexpand_linear_gpu(x, **prepared, act_bits=..., group_size=..., rotation=...)``.
    """
    out = {
        "weight": repack_for_kernel(weight_packed),
        "weight_scale": weight_scale.to(torch.float32).contiguous(),
        "weight_sums": weight_code_sums(weight_packed),
    }
    if rotation is not None:
        hrow, hcol = hadamard_operands(rotation[0], rotation[1], rotation[2], act_dtype, weight_packed.device)
        out.update(hrow=hrow, hcol=hcol)
    return out


def qexpand_linear_gpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    act_bits: Optional[int],
    act_clip: float = 1.0,
    group_size: int = 0,
    rotation: Optional[Tuple[int, int, int]] = None,
    bias: Optional[torch.Tensor] = None,
    weight_sums: Optional[torch.Tensor] = None,
    hrow: Optional[torch.Tensor] = None,
    hcol: Optional[torch.Tensor] = None,
    hk: Optional[torch.Tensor] = None,
    amax_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """The qexpand linear on GPU: x [..., N] -> [..., out] in x.dtype (docs/format.md, run time).

    pad N -> M + online Hadamard + per-token quantization (``qexpand::hadamard_quant``), then
    the W4A8 / W4A4 GEMM. ``rotation`` is this rank's (size M, k, blocks) or None (then
    M = N, quantization only). ``weight`` is the checkpoint's int32 [out, M/8] or, better,
    the uint8 from :func:`prepare_weights`, which also gives ``weight_sums`` / ``hrow`` /
    ``hcol``. Any of those left None is derived here on every call (``weight_sums``: a pass
    over the weight, W4A4 only; the matrices: a per-process cache): correct but slower, and
    not something a CUDA-graph capture should be the first to run. ``hk`` is accepted and
    unused (the matrices already hold H_K). ``act_bits=None`` (W4A16) is refused: the
    plugin serves W4A16 with vLLM's Machete/Marlin kernels (``plugin/w4a16.py``). ``act_clip``
    is the checkpoint's ``activations.clip`` (per-token scale = (max · act_clip) / qmax).

    ``amax_reduce`` (row-parallel layers at tensor parallelism > 1): maps this rank's
    per-token max|x'| [T, 1] to the whole token's (an all-gather + max across ranks). The
    fused kernel then runs twice: ``qexpand::hadamard_absmax`` (rotation, per-token max only),
    ``amax_reduce``, and ``qexpand::hadamard_quant_amax`` (rotation again, quantized with the
    reduced max). Every step stays on x's device and is CUDA-graph capturable.
    """
    if act_bits not in (4, 8):
        raise NotImplementedError(
            f"qexpand_linear_gpu: act_bits={act_bits}; W4A16 is served by vLLM's Machete/Marlin kernels "
            "(our value+8 nibbles are vLLM's uint4b8) through vllm_qexpand.plugin.w4a16, not by this function"
        )
    if weight.dtype == torch.int32:
        if act_bits == 4 and weight_sums is None:
            weight_sums = weight_code_sums(weight)
        weight = repack_for_kernel(weight)
    elif act_bits == 4 and weight_sums is None:
        raise ValueError("W4A4 with a repacked weight needs weight_sums (see prepare_weights)")
    if rotation is None:
        size, k, blocks = x.shape[-1], 0, 1
        hrow = hcol = weight_scale  # unused placeholders
    else:
        size, k, blocks = rotation
        if hrow is None or hcol is None:
            hrow, hcol = rotation_operands(rotation, x.dtype, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # int8 codes (W4A8, or W4A4 with W4A4_CODES = "int8") go in plane order, which the W4A8 GEMM
    # multiplies with its weight nibble planes as they are
    int8_codes = act_bits == 8 or W4A4_CODES == "int8"
    planes = int8_codes and size % 64 == 0 and group_size % 64 == 0
    if amax_reduce is None:
        codes, scale, sums = torch.ops.qexpand.hadamard_quant(x2, hrow, hcol, size, k, blocks, act_bits, planes,
                                                              int8_codes, act_clip)
    else:  # two passes of the fused kernel around the cross-rank max (the rotation is recomputed)
        local = torch.ops.qexpand.hadamard_absmax(x2, hrow, hcol, size, k, blocks)
        amax = amax_reduce(local)
        codes, scale, sums = torch.ops.qexpand.hadamard_quant_amax(x2, hrow, hcol, amax, size, k, blocks, act_bits,
                                                                   planes, int8_codes, act_clip)
    if int8_codes:
        y = torch.ops.qexpand.w4a8_gemm(codes, scale, sums, weight, weight_scale, group_size, x.dtype, bias, planes)
    else:
        y = torch.ops.qexpand.w4a4_gemm(codes, scale, sums, weight, weight_sums, weight_scale, group_size, x.dtype, bias)
    return y.reshape(*lead, weight.shape[0])


def _fake_codes(x: torch.Tensor, size: int, bits: int, codes_int8: bool):
    """Empty (codes, scale, sums) of the Hadamard+quant ops' outputs, for torch.compile / CUDA-graph tracing."""
    bits = 8 if codes_int8 else bits
    codes, scale, sums = output_shapes(x.shape[0], size, bits)
    return (
        x.new_empty(codes, dtype=torch.int8 if bits == 8 else torch.uint8),
        x.new_empty(scale, dtype=torch.float32),
        x.new_empty(sums, dtype=torch.int32),
    )


def _register() -> None:
    from . import hadamard_quant as hq
    from . import w4a8_gemm as gm

    devices = ("cuda", "cpu") if interpreting() else ("cuda",)

    @torch.library.custom_op("qexpand::hadamard_quant", mutates_args=(), device_types=devices)
    def hadamard_quant(
        x: torch.Tensor, hrow: torch.Tensor, hcol: torch.Tensor, size: int, k: int, blocks: int, bits: int,
        planes: bool = False, codes_int8: bool = False, clip: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return hq.hadamard_quant(x, size, k, blocks, bits, hrow if k else None, hcol if k else None, planes=planes,
                                 codes_int8=codes_int8, clip=clip)

    @hadamard_quant.register_fake
    def _(x, hrow, hcol, size, k, blocks, bits, planes=False, codes_int8=False, clip=1.0):
        return _fake_codes(x, size, bits, codes_int8)

    @torch.library.custom_op("qexpand::hadamard_absmax", mutates_args=(), device_types=devices)
    def hadamard_absmax(
        x: torch.Tensor, hrow: torch.Tensor, hcol: torch.Tensor, size: int, k: int, blocks: int
    ) -> torch.Tensor:
        return hq.hadamard_absmax(x, size, k, blocks, hrow if k else None, hcol if k else None)

    @hadamard_absmax.register_fake
    def _(x, hrow, hcol, size, k, blocks):
        return x.new_empty((x.shape[0], 1), dtype=torch.float32)

    @torch.library.custom_op("qexpand::hadamard_quant_amax", mutates_args=(), device_types=devices)
    def hadamard_quant_amax(
        x: torch.Tensor, hrow: torch.Tensor, hcol: torch.Tensor, amax: torch.Tensor, size: int, k: int, blocks: int,
        bits: int, planes: bool = False, codes_int8: bool = False, clip: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return hq.hadamard_quant(x, size, k, blocks, bits, hrow if k else None, hcol if k else None, amax=amax,
                                 planes=planes, codes_int8=codes_int8, clip=clip)

    @hadamard_quant_amax.register_fake
    def _(x, hrow, hcol, amax, size, k, blocks, bits, planes=False, codes_int8=False, clip=1.0):
        return _fake_codes(x, size, bits, codes_int8)

    @torch.library.custom_op("qexpand::w4a8_gemm", mutates_args=(), device_types=devices)
    def w4a8_gemm(
        a: torch.Tensor,
        a_scale: torch.Tensor,
        a_sum: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        group_size: int,
        out_dtype: torch.dtype,
        bias: Optional[torch.Tensor],
        a_planes: bool = False,
    ) -> torch.Tensor:
        return gm.w4a8_gemm(a, a_scale, a_sum, weight, weight_scale, group_size, out_dtype, bias, a_planes=a_planes)

    @w4a8_gemm.register_fake
    def _(a, a_scale, a_sum, weight, weight_scale, group_size, out_dtype, bias, a_planes=False):
        return a.new_empty((a.shape[0], weight.shape[0]), dtype=out_dtype)

    @torch.library.custom_op("qexpand::w4a4_gemm", mutates_args=(), device_types=devices)
    def w4a4_gemm(
        a: torch.Tensor,
        a_scale: torch.Tensor,
        a_sum: torch.Tensor,
        weight: torch.Tensor,
        weight_sums: torch.Tensor,
        weight_scale: torch.Tensor,
        group_size: int,
        out_dtype: torch.dtype,
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return gm.w4a4_gemm(a, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias)

    @w4a4_gemm.register_fake
    def _(a, a_scale, a_sum, weight, weight_sums, weight_scale, group_size, out_dtype, bias):
        return a.new_empty((a.shape[0], weight.shape[0]), dtype=out_dtype)


if HAS_TRITON:
    _register()
    OPS_REGISTERED = True
