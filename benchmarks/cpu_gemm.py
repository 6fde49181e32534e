"""CPU GEMM layouts of a qexpand linear, timed per call: what integer-exact (batch-invariant) GEMMs cost.

For the four GEMMs of one SmolLM2-135M decoder layer (qkv 576->960, o 576->576, gate_up
576->3072, down 1536->576), random int4 codes and per-channel scales, per-token int4
activation codes, this times (µs per layer, best of ``--repeat``, one thread unless
``--threads``):

    dense-dequantized   the layout before batch invariance: the dequantized float32 weight
                        prepacked in oneDNN, GEMM on q_x·s_x (not batch invariant)
    dense-codes         today's decode layout: the float32 *codes* prepacked in oneDNN, exact
                        sums, then (acc·s_w)·s_x  (plugin/cpu.py CodeGemm)
    int8                today's prefill layout: oneDNN s8s8 with unit scales, then (acc·s_w)·s_x
                        (plugin/cpu.py Int8Gemm)

and checks that dense-codes and int8 give the same bits. Writes
``benchmarks/results/cpu-gemm-<date>.json``::

    python benchmarks/cpu_gemm.py [--tokens 1,16,64,128,512] [--threads 1] [--repeat 30]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,16,64,128,512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch

    from vllm_qexpand.plugin import cpu
    from vllm_qexpand.quant import dequantize_weight, quantize_activation

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, 1, generator=g) * 0.02 + 1e-3
        layers[name] = {"old": cpu.DenseGemm(dequantize_weight(codes, scale)),
                        "codes": cpu.CodeGemm(codes, scale, 0, 4), "int8": cpu.Int8Gemm(codes, scale)}
    rows = []
    for t in [int(x) for x in a.tokens.split(",")]:
        acts = {name: quantize_activation(torch.randn(t, k, generator=g), 4) for name, (_, k) in SHAPES.items()}
        calls = {
            "dense-dequantized": lambda name: layers[name]["old"].float_mm(acts[name][0] * acts[name][1]),
            "dense-codes": lambda name: layers[name]["codes"].quant_mm(*acts[name]),
            "int8": lambda name: layers[name]["int8"].quant_mm(*acts[name]),
        }
        same = all(torch.equal(calls["dense-codes"](n), calls["int8"](n)) for n in SHAPES)
        row = {"tokens": t, "codes_equal_int8": same}
        for label, call in calls.items():
            best = float("inf")
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                for name in SHAPES:
                    call(name)
                best = min(best, time.perf_counter() - t0)
            row[label + "_us"] = round(best * 1e6, 1)
        row["codes_vs_dequantized"] = round(row["dense-codes_us"] / row["dense-dequantized_us"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    date = datetime.date.today().isoformat()
    out = a.out or ROOT / "benchmarks" / "results" / f"cpu-gemm-{date}.json"
    out.write_text(json.dumps({"benchmark": "cpu-gemm", "date": date, "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine(), "threads": a.threads,
                               "repeat": a.repeat, "shapes": SHAPES, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
