"""The OpenAI server of a test (`python -m vllm_qexpand.serve` on a free loopback port), and one vLLM engine
run as a script in a fresh process (`run_engine_script`)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_server(path, log: Path, *args: str, eager: bool = True, env: dict | None = None):
    """Serve `path` (float32, eager, 16 sequences, 64 MiB KV cache, seed 0, plus `args`), output to `log`.

    `eager=False` leaves out --enforce-eager (vLLM's default compile mode); `env` is added to the
    server's environment. Yields (base URL, process) once /health answers; fails the test with the
    log's tail if the server exits or is not healthy within START_TIMEOUT_S. Stops it on exit: SIGINT
    (vLLM shuts its engine processes down), then SIGKILL to its own process group after 60 s.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_qexpand.serve", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", *(["--enforce-eager"] if eager else []), "--max-num-seqs", "16",
           "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0", *args]  # fmt: skip
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            env=None if env is None else {**os.environ, **env})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its children only
                proc.wait()
        fh.close()


def run_engine_script(script: str, args: dict, log: Path, *, workers: int = 1, timeout: float = 300,
                      trace: Path | None = None) -> tuple:
    """(returncode, result dict or None, full log) of `python -c script json(args)` in a fresh process.

    The script prints one line ``RESULT <json>``. CPU vLLM's environment is set; with `workers` > 1 each
    worker gets its own OpenMP thread set, round-robin over the cores; `trace` sets VLLM_QEXPAND_TRACE.
    """
    env = dict(os.environ)
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_USE_AOT_COMPILE="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_QEXPAND_TRACE", None)
    if trace is not None:
        env["VLLM_QEXPAND_TRACE"] = str(trace)
    if workers > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % (os.cpu_count() or 1)) for r in range(workers))
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    result = None
    for ln in text.splitlines():
        if ln.startswith("RESULT "):
            result = json.loads(ln[len("RESULT "):])
    return rc, result, text
