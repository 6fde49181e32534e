"""Peak RSS and time of converting a Llama-3.2-1B-shaped random checkpoint.

    python benchmarks/convert_memory.py [--workdir DIR] [--layers 16] [--keep]

Writes the random source (bf16, shards of about 1 GB, tied embeddings like the
real model) straight from generated tensors, converts it in a child process
(w4a4, down_proj expanded one step) and reports the child's peak RSS (target
<= 3 GiB) as JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             head_dim=64, vocab_size=128256)


def make_source(path: Path, layers: int) -> None:
    path.mkdir(parents=True)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    save_file({"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
              str(path / "model-embed.safetensors"))
    for n in range(layers):
        p = f"model.layers.{n}"
        save_file({
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.self_attn.q_proj.weight": rnd(h, h), f"{p}.self_attn.k_proj.weight": rnd(kv, h),
            f"{p}.self_attn.v_proj.weight": rnd(kv, h), f"{p}.self_attn.o_proj.weight": rnd(h, h),
            f"{p}.mlp.gate_proj.weight": rnd(i, h), f"{p}.mlp.up_proj.weight": rnd(i, h),
            f"{p}.mlp.down_proj.weight": rnd(h, i),
        }, str(path / f"model-layer{n:03d}.safetensors"))
    config = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=layers,
                  hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="bfloat16",
                  max_position_embeddings=8192, rope_theta=500000.0)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qexpand-mem-"))
    src, dst = work / "src", work / "dst"
    try:
        if not src.exists():
            make_source(src, args.layers)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "vllm_qexpand.cli", "convert", str(src), str(dst), "--force", "--quiet",
               "--rtn", "--scheme", "w4a4", "--expand", "down_proj=1"]  # the streaming RTN conversion
        subprocess.run(cmd, check=True)
        elapsed = time.perf_counter() - t0
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        src_gib = sum(f.stat().st_size for f in src.iterdir()) / 2**30
        result = {
            "benchmark": "convert_memory", "device": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "model": f"random Llama-3.2-1B shape, {args.layers} layers, bf16", "source_gib": round(src_gib, 3),
            "command": " ".join(cmd[1:]), "peak_rss_gib": round(peak_gib, 3), "seconds": round(elapsed, 1),
            "target_peak_rss_gib": 3.0,
        }
        out = Path(__file__).parent / "results" / f"convert_memory-{result['date']}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
