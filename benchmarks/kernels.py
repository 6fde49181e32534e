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
- ``hadamard_quant8``, ``hadamard_quant4``: the activation kernel for each down_proj input
  (N -> M), baseline ``memcpy`` (copy of the bf16 input).

ratio = baseline_ms / ms (> 1: the kernel is faster). Timings: triton.testing.do_bench medians.
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
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4),
    (64, 128, 128, 8, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
    (256, 128, 64, 16, 3), (256, 128, 128, 8, 3),
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
            for kernel in ("w4a8", "w4a4", "int_mm", "linear_w4a8", "linear_w4a4"):
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


def run(rows: list[dict], tune: bool = False, log=print, device: str = "cuda", bench=None) -> list[dict]:
    """Time ``rows`` (from :func:`plan_rows`). ``device``/``bench`` are only overridden by the CPU smoke test."""
    import torch

    from vllm_qexpand.kernels import hadamard_quant as hq
    from vllm_qexpand.kernels import ops
    from vllm_qexpand.kernels import w4a8_gemm as gm

    dev = torch.device(device)
    if bench is None:
        import triton.testing

        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    cache: dict = {}

    def tensors(m, n, k, n_in):
        key = (m, n, k, n_in)
        if key not in cache:
            cache.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=dev).manual_seed(0)
            wq = torch.randint(0, 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32, generator=g)
            cache[key] = {
                "x": torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g),
                "x_in": torch.randn(m, n_in, device=dev, dtype=torch.bfloat16, generator=g),
                "w_bf16": torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g),
                "w_packed": wq,
                "w": gm.repack_for_kernel(wq),
                "w_sums": gm.weight_code_sums(wq),
                "w_scale": torch.rand(n, 1, device=dev, generator=g) * 0.01,
                "a8": torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g),
                "a4": torch.randint(0, 256, (m, k // 2), device=dev, dtype=torch.uint8, generator=g),
                "a_scale": torch.rand(m, 1, device=dev, generator=g),
                "a_sum": torch.randint(-1000, 1000, (m,), device=dev, dtype=torch.int32, generator=g),
            }
        return cache[key]

    def best_gemm(fn_of_config, m, n, k):
        if not tune:
            return bench(lambda: fn_of_config(None)), None
        best = (float("inf"), None)
        for bm, bn, bk, warps, stages in TUNE_CONFIGS:
            for split in TUNE_SPLITS:
                cfg = {"BM": bm, "BN": bn, "BK": bk, "split_k": split, "num_warps": warps, "num_stages": stages}
                try:
                    ms = bench(lambda: fn_of_config(cfg))
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
            t = tensors(m, 8, k, n)  # for these rows N is the input width
            bits = int(kernel[len("hadamard_quant"):])
            size, kk = _rotation(n, k, True)
            hrow, hcol = hq.hadamard_operands(size, kk, 1, torch.bfloat16, dev)
            ms = bench(lambda: hq.hadamard_quant(t["x_in"], size, kk, 1, bits, hrow, hcol))
            buf = torch.empty_like(t["x_in"])
            base_ms = bench(lambda: buf.copy_(t["x_in"]))
            cfg = None
        else:
            t = tensors(m, n, k, n_in)
            # GEMM rows: bf16 at the same shape; linear rows: the unquantized bf16 linear (width N_in)
            kb = n_in if kernel.startswith("linear") else k
            bkey = (m, n, kb)
            if bkey not in baselines:
                xb, wb = (t["x_in"], t["w_bf16"][:, :kb]) if kb != k else (t["x"], t["w_bf16"])
                baselines[bkey] = bench(lambda: xb @ wb.t())
            base_ms = baselines[bkey]
            if kernel == "w4a8":
                ms, cfg = best_gemm(lambda c: gm.w4a8_gemm(t["a8"], t["a_scale"], t["a_sum"], t["w"], t["w_scale"], 0, torch.bfloat16, config=c), m, n, k)
            elif kernel == "w4a4":
                ms, cfg = best_gemm(lambda c: gm.w4a4_gemm(t["a4"], t["a_scale"], t["a_sum"], t["w"], t["w_sums"], t["w_scale"], 0, torch.bfloat16, config=c), m, n, k)
            elif kernel == "int_mm":
                w8 = t["w_bf16"].to(torch.int8)
                ms, cfg = bench(lambda: torch._int_mm(t["a8"], w8.t())), None
            else:
                bits = 8 if kernel.endswith("8") else 4
                size, kk = _rotation(n_in, k, row["_layer"].startswith("down"))
                x = t["x_in"] if kk else t["x"]
                rot = (size, kk, 1) if kk else None
                p = ops.prepare_weights(t["w_packed"], t["w_scale"], rotation=rot, act_dtype=torch.bfloat16)
                ms = bench(lambda: ops.qexpand_linear_gpu(x, **p, act_bits=bits, rotation=rot))
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
