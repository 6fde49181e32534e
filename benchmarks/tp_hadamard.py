"""What --tp-blocks saves per rank: the online rotation of a row-parallel layer at TP = t.

    python benchmarks/tp_hadamard.py [--tokens 256] [--repeats 20] [--out FILE]

For each layer width N (SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B down_proj) and B in
1, 2, 4, 8, one `--expand` step is taken per block (the converter's size rule on N/B), and
rank 0 of TP = B rotates its own slice: one block, [T, N/B] padded to M/B
(`quant.online_rotate`, the plugin's CPU rotation). The B = 1 row is what every rank would
run without blocks (after gathering the full [T, N] input). Times are the median of
`--repeats` calls on this machine's CPU (torch, float32), written as JSON under
benchmarks/results/ with the device, torch version and date. FLOPs are not modelled: it is
measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import device_string  # noqa: E402
from vllm_qexpand.hadamard import factor, hadamard_k, next_size  # noqa: E402
from vllm_qexpand.quant import online_rotate  # noqa: E402

LAYERS = {"smollm2-135m down_proj": 1536, "llama-3.2-1b down_proj": 8192, "llama-3.1-8b down_proj": 14336}


def time_rotation(x: torch.Tensor, size: int, k: int, repeats: int) -> float:
    hk = hadamard_k(k).to(torch.float32)
    online_rotate(x, size, k, hk)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        online_rotate(x, size, k, hk)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for layer, n in LAYERS.items():
        base_ms = None
        for b in (1, 2, 4, 8):
            width = n // b
            size = next_size(width, 1, 8)
            k = factor(size)[0]
            x = torch.randn(a.tokens, width)
            ms = time_rotation(x, size, k, a.repeats)
            base_ms = base_ms or ms
            rows.append({"layer": layer, "N": n, "B": b, "tp": b, "rank_input": width, "rank_rotation_size": size,
                         "K": k, "ms": round(ms, 4), "ratio_to_B1": round(base_ms / ms, 2)})
            print(f"{layer:<24} B={b}  rank rotates [{a.tokens}, {width}] -> {size} (K={k}): {ms:8.3f} ms  "
                  f"x{base_ms / ms:.2f} vs B=1", flush=True)
    result = {"benchmark": "tp_hadamard", "device": device_string(), "torch": torch.__version__,
              "date": dt.date.today().isoformat(), "tokens": a.tokens, "repeats": a.repeats, "rows": rows}
    out = a.out or ROOT / "benchmarks" / "results" / f"tp-hadamard-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
