"""GPU micro-benchmark of the qexpand Triton kernels against cuBLAS / memcpy baselines.

    python benchmarks/kernels.py                 # all shapes, writes benchmarks/results/kernels-<device>-<date>.json
    python benchmarks/kernels.py --dry-run       # list the rows that would be measured (no GPU needed)
    python benchmarks/kernels.py --models 8b --m 16 4096 --tune

Shapes: the linears of Llama-3.2-1B and Llama-3.1-8B (qkv, o, gate_up, down), plus the
expanded down_proj input widths (1B: 8960, 10240, 12288; 8B: 15360, 17920). Rows:

- ``w4a8``, ``w4a4``: the GEMM alone (codes precomputed), baseline ``cublas_bf16`` (x @ w.t());
- ``int_mm``: ``torch._int_mm`` int8 x int8 (M > 16 only), baseline ``cublas_bf16``;
- ``linear_w4a8``, ``linear_w4a4``: ``qexpand_linear_gpu`` (quantization, with the online
  rotation on down_proj, + GEMM), baseline ``cublas_bf16`` of the unexpanded linear
  (input width N_in: for the expanded down_proj rows, the bf16 model's own down_proj);
  ``linear_w4a4_i8``: the same W4A4 linear with its 4-bit codes stored as int8 through the
  W4A8 GEMM (``VLLM_QEXPAND_W4A4_CODES=int8``; bit-identical output);
- ``hadamard_quant8``, ``hadamard_quant4``: the activation kernel for each down_proj input
  (N -> M), baseline ``memcpy`` (copy of the bf16 input).

ratio = baseline_ms / ms (> 1: the kernel is faster).

Timing (:func:`bench_graph`): every row, kernel and baseline alike, is one CUDA graph that
calls the operation once per copy of its weights (or, for the weight-free rows, of its input),
with enough copies (>= 256 MB, at most 128) that nothing stays in the 50 MB L2; a replay is
timed with CUDA events and divided by the number of calls (median of 20 replays). So launch
overhead is what a graph-captured model pays, and weights come from HBM as in a real forward.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

M_VALUES = (1, 16, 64, 256, 1024, 4096, 8192)

# name -> (hidden, intermediate, heads, kv heads, head dim, expanded down_proj widths)
MODELS = {
    "1b": ("Llama-3.2-1B", 2048, 8192, 32, 8, 64, (8960, 10240, 12288)),
    "8b": ("Llama-3.1-8B", 4096, 14336, 32, 8, 128, (15360, 17920)),
}

# tile configs tried by --tune: (BM, BN, BK, num_warps, num_stages)
TUNE_CONFIGS = [
    (16, 64, 128, 4, 4), (16, 64, 128, 4, 2), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4),
    (64, 128, 64, 4, 2), (64, 128, 128, 8, 4), (128, 64, 64, 4, 2), (128, 128, 64, 8, 2), (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (256, 128, 64, 16, 3), (256, 128, 128, 8, 3),
]
TUNE_SPLITS = (1, 2, 4, 8)


def linear_shapes(models=("1b", "8b")) -> list[dict]:
    """One dict per linear: model, layer, N (outputs), N_in (logical input), K (weight input width)."""
    out = []
    for key in models:
        name, h, inter, heads, kv, hd, expanded = MODELS[key]
        base = [("qkv", (heads + 2 * kv) * hd, h), ("o", h, heads * hd), ("gate_up", 2 * inter, h), ("down", h, inter)]
        for layer, n, k in base:
            out.append({"model": name, "layer": layer, "N": n, "N_in": k, "K": k})
        for k in expanded:
            out.append({"model": name, "layer": f"down_x{k}", "N": h, "N_in": inter, "K": k})
    return out


def plan_rows(models=("1b", "8b"), ms=M_VALUES) -> list[dict]:
    """The rows a full run measures (without timings)."""
    rows = []
    for s in linear_shapes(models):
        for m in ms:
            for kernel in ("w4a8", "w4a4", "int_mm", "linear_w4a8", "linear_w4a4", "linear_w4a4_i8"):
                if kernel == "int_mm" and m <= 16:
                    continue
                rows.append({"kernel": kernel, "M": m, "N": s["N"], "K": s["K"], "baseline": "cublas_bf16", **_meta(s)})
            if s["layer"].startswith("down"):
                for bits in (8, 4):
                    rows.append({"kernel": f"hadamard_quant{bits}", "M": m, "N": s["N_in"], "K": s["K"], "baseline": "memcpy", **_meta(s)})
    return rows


def _meta(s: dict) -> dict:
    return {"_model": s["model"], "_layer": s["layer"], "_N_in": s["N_in"]}


def _rotation(n_in: int, k: int, is_down: bool) -> tuple[int, int]:
    """(size, k) of the online rotation used for a row: down_proj rotates N_in -> K, others none."""
    from vllm_qexpand import hadamard

    if not is_down:
        return k, 0
    f = hadamard.factor(k)
    if f is None:
        raise ValueError(f"no Hadamard factorisation for {k}")
    return k, f[0]


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


L2_FLUSH_BYTES = 256 * 2**20
MAX_COPIES = 128


def n_copies(nbytes: int) -> int:
    """How many copies of an operand of ``nbytes`` make >= 256 MB (1 to 128)."""
    return max(1, min(MAX_COPIES, -(-L2_FLUSH_BYTES // max(1, nbytes))))


def bench_graph(fns, reps: int = 20) -> float:
    """ms per call of ``fns`` (one callable per weight copy), replayed as one CUDA graph."""
    import statistics

    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / autotune / allocate outside the capture
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    return statistics.median(times)


def run(rows: list[dict], tune: bool = False, log=print, device: str = "cuda", bench=None) -> list[dict]:
    """Time ``rows`` (from :func:`plan_rows`). ``device``/``bench`` are only overridden by the CPU smoke test.

    ``bench(fns) -> ms`` takes one callable per copy of the operands (default :func:`bench_graph`).
    """
    import torch

    from vllm_qexpand.kernels import hadamard_quant as hq
    from vllm_qexpand.kernels import ops
    from vllm_qexpand.kernels import w4a8_gemm as gm

    dev = torch.device(device)
    bench = bench or bench_graph
    cache: dict = {}

    def tensors(m, n, k, n_in):
        key = (m, n, k, n_in)
        if key not in cache:
            cache.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=dev).manual_seed(0)
            cw = n_copies(n * k // 2)  # int4 weight copies
            cb = n_copies(2 * n * k)  # bf16 weight copies
            wq = [torch.randint(0, 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32, generator=g) for _ in range(cw)]
            cache[key] = {
                "x": torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g),
                "x_in": torch.randn(m, n_in, device=dev, dtype=torch.bfloat16, generator=g),
                "w_bf16": [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(cb)],
                "w_packed": wq,
                "w": [gm.repack_for_kernel(w) for w in wq],
                "w_sums": [gm.weight_code_sums(w) for w in wq],
                "w_scale": [torch.rand(n, 1, device=dev, generator=g) * 0.01 for _ in wq],
                "a8": torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g),
                "a4": torch.randint(0, 256, (m, k // 2), device=dev, dtype=torch.uint8, generator=g),
                "a_scale": torch.rand(m, 1, device=dev, generator=g),
                "a_sum": torch.randint(-1000, 1000, (m,), device=dev, dtype=torch.int32, generator=g),
            }
        return cache[key]

    def per_copy(fn_of_copy, copies):
        return [(lambda i=i: fn_of_copy(i)) for i in range(copies)]

    def best_gemm(fn_of_config, copies):
        if not tune:
            return bench(per_copy(lambda i: fn_of_config(None, i), copies)), None
        best = (float("inf"), None)
        for bm, bn, bk, warps, stages in TUNE_CONFIGS:
            for split in TUNE_SPLITS:
                cfg = {"BM": bm, "BN": bn, "BK": bk, "split_k": split, "num_warps": warps, "num_stages": stages}
                try:
                    ms = bench(per_copy(lambda i: fn_of_config(cfg, i), copies))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    log(f"  config {cfg} failed: {type(e).__name__}")
                    continue
                best = min(best, (ms, cfg), key=lambda b: b[0])
        return best

    baselines: dict = {}
    out = []
    for row in rows:
        m, n, k, n_in = row["M"], row["N"], row["K"], row["_N_in"]
        kernel = row["kernel"]
        if kernel.startswith("hadamard_quant"):
            bits = int(kernel[len("hadamard_quant"):])
            size, kk = _rotation(n, k, True)
            copies = n_copies(2 * m * n)  # for these rows N is the input width
            xs = [torch.randn(m, n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            hrow, hcol = hq.hadamard_operands(size, kk, 1, torch.bfloat16, dev)
            ms = bench(per_copy(lambda i: hq.hadamard_quant(xs[i], size, kk, 1, bits, hrow, hcol), copies))
            bufs = [torch.empty_like(x) for x in xs]
            base_ms = bench(per_copy(lambda i: bufs[i].copy_(xs[i]), copies))
            cfg = None
            del xs, bufs
        else:
            t = tensors(m, n, k, n_in)
            cw = len(t["w"])
            # GEMM rows: bf16 at the same shape; linear rows: the unquantized bf16 linear (width N_in)
            kb = n_in if kernel.startswith("linear") else k
            bkey = (m, n, kb)
            if bkey not in baselines:
                xb = t["x_in"] if kb != k else t["x"]
                wbs = [w[:, :kb] for w in t["w_bf16"]]
                baselines[bkey] = bench(per_copy(lambda i: xb @ wbs[i].t(), len(wbs)))
            base_ms = baselines[bkey]
            if kernel == "w4a8":
                ms, cfg = best_gemm(lambda c, i: gm.w4a8_gemm(t["a8"], t["a_scale"], t["a_sum"], t["w"][i], t["w_scale"][i], 0, torch.bfloat16, config=c), cw)
            elif kernel == "w4a4":
                ms, cfg = best_gemm(lambda c, i: gm.w4a4_gemm(t["a4"], t["a_scale"], t["a_sum"], t["w"][i], t["w_sums"][i], t["w_scale"][i], 0, torch.bfloat16, config=c), cw)
            elif kernel == "int_mm":
                w8 = [w.to(torch.int8) for w in t["w_bf16"]]
                ms, cfg = bench(per_copy(lambda i: torch._int_mm(t["a8"], w8[i].t()), len(w8))), None
                del w8
            else:
                bits = 8 if kernel == "linear_w4a8" else 4
                size, kk = _rotation(n_in, k, row["_layer"].startswith("down"))
                x = t["x_in"] if kk else t["x"]
                rot = (size, kk, 1) if kk else None
                ps = [ops.prepare_weights(w, s, rotation=rot, act_dtype=torch.bfloat16) for w, s in zip(t["w_packed"], t["w_scale"])]
                codes_mode = ops.W4A4_CODES
                ops.W4A4_CODES = "int8" if kernel == "linear_w4a4_i8" else "int4"  # W4A4 codes stored as int8
                try:
                    ms = bench(per_copy(lambda i: ops.qexpand_linear_gpu(x, **ps[i], act_bits=bits, rotation=rot), cw))
                finally:
                    ops.W4A4_CODES = codes_mode
                cfg = None
        res = {key: row[key] for key in ("kernel", "M", "N", "K")}
        res.update(ms=round(ms, 5), baseline=row["baseline"], baseline_ms=round(base_ms, 5), ratio=round(base_ms / ms, 3))
        if cfg is not None:
            res["config"] = cfg
        log(f"{row['_model']:<13} {row['_layer']:<10} {kernel:<16} M={m:<5} N={n:<6} K={k:<6} {ms:8.4f} ms  {row['baseline']} {base_ms:8.4f} ms  x{base_ms / ms:.2f}")
        out.append(res)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the rows and exit (no GPU needed)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["1b", "8b"])
    ap.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="token counts")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernel names")
    ap.add_argument("--tune", action="store_true", help="sweep GEMM tile configs and split-K, keep the best")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    rows = plan_rows(args.models, args.m)
    if args.kernels:
        rows = [r for r in rows if r["kernel"] in args.kernels]
    if args.dry_run:
        for r in rows:
            print(f"{r['_model']:<13} {r['_layer']:<10} {r['kernel']:<16} M={r['M']:<5} N={r['N']:<6} K={r['K']:<6} baseline={r['baseline']}")
        print(f"{len(rows)} rows")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); use --dry-run to list the shapes", file=sys.stderr)
        return 2
    from vllm_qexpand.kernels import HAS_TRITON, interpreting

    if not HAS_TRITON or interpreting():
        print("benchmarks/kernels.py needs compiled Triton (installed, TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    import triton

    results = run(rows, tune=args.tune)
    device = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    doc = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "date": date, "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{_device_slug(device)}-{date}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
