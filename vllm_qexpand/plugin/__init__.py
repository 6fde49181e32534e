"""The vLLM plugin: quantization method "qexpand" (QExpandConfig + QExpandLinearMethod).

vLLM calls :func:`register` in every process (API server, engine core, workers) through
the ``vllm.general_plugins`` entry point ``qexpand = vllm_qexpand:register``. Importing
this package does not import vLLM; ``register()`` does.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Register the "qexpand" quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from . import config  # noqa: F401  - @register_quantization_config("qexpand")
    from . import linear  # noqa: F401  - @register_weight_loader_v2_supported_method

    _registered = True


__all__ = ["register"]
