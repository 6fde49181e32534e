"""vllm-qexpand: rotated, expanded int4 checkpoints and the vLLM plugin that serves them."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM `vllm.general_plugins` entry point: registers the `qexpand` quantization method.

    Idempotent; imports vLLM only when called.
    """
    from .plugin import register as _register

    _register()
