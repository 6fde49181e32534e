"""GPU kernels (Triton) for qexpand linears, each beside its pure-torch reference.

- ``hadamard_quant``: zero-pad N -> M, Hadamard T_M (per block when B > 1), per-token
  int8 / int4 quantization, per-token scale and code sum, in one pass per token block.
- ``w4a8_gemm``: int4 weights (value+8 nibbles) x int8 or packed-int4 activation codes,
  int8 ``tl.dot`` with int32 accumulation and the zero-point / scale epilogue (W4A8 and
  W4A4 share the kernel).
- ``ops``: the ``torch.ops.qexpand.*`` custom ops (with fake impls) and
  ``qexpand_linear_gpu``, the entry point the plugin calls on GPU.
- ``aot``: compiles the dispatch's launches for sm_90a without a GPU, as the JIT would, and reads
  their SASS (the static report, ``benchmarks/kernel_sass.py``; a quick subset runs in CI).

Layouts and how to run the benchmark: docs/kernels.md.

W4A16 (activations not quantized) has no kernel here. On GPU it goes through vLLM's
mixed-precision kernel selection (Machete on Hopper, Marlin elsewhere), wired in
``vllm_qexpand/plugin/w4a16.py``: our weight codes are stored value+8 in [0, 15], which is
vLLM's ``uint4b8`` type, eight consecutive inputs per int32 word, the layout of
compressed-tensors' pack-quantized W4A16, so vLLM's repack for those kernels takes the
checkpoint words as they are. The online rotation stays ours (``quant.online_rotate``,
plain PyTorch; no quantization).

Importing this package never needs Triton: ``HAS_TRITON`` says whether the Triton
kernels (and the custom ops) are available.
"""
from __future__ import annotations

try:  # Triton is optional: CPU-only installs still import the references.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def interpreting() -> bool:
    """True when this package's Triton kernels run in Triton's CPU interpreter.

    Triton decides when a kernel is decorated, i.e. from TRITON_INTERPRET at the moment the
    kernel modules are first imported; this reports that decision, whatever the variable
    says now.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from .hadamard_quant import _hadamard_quant_kernel

    return isinstance(_hadamard_quant_kernel, InterpretedFunction)


__all__ = ["HAS_TRITON", "interpreting"]
