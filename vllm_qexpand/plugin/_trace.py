"""Opt-in event log of the plugin, written from whichever vLLM process runs it (tests use it).

Set ``VLLM_QEXPAND_TRACE=/path/file``: lines ``<event> pid=<pid> <layer> <details>`` are
appended when a layer is loaded (``load``), first applied (``apply``, eager only) and when
a CPU GEMM kernel is first used by a layer (``kernel``, also under torch.compile: the
GEMM is an opaque custom op that runs eagerly).
"""
from __future__ import annotations

import os

TRACE_ENV = "VLLM_QEXPAND_TRACE"


def trace(event: str, prefix: str, detail: str = "") -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event} pid={os.getpid()} {prefix} {detail}\n")
