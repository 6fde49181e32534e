"""The first GPU run: every kernel path against its torch reference, then the ratios, in <= 6 minutes.

    python benchmarks/first_gpu_run.py                  # torch + Triton only (no vLLM), on an H100 / H200
    python benchmarks/first_gpu_run.py --budget 300     # seconds for the whole run (default 330)

Writes ``benchmarks/results/first-gpu-run-<device>-<date>.json`` after every step, so a run cut
short still leaves what it did. Steps, each recorded as {"step", "ok", "seconds", ...}:

1. ``env``: device, SMs, torch / Triton versions.
2. ``hadamard_quant``: every planned size (576, 1536, 4096, 8192, 14336 and the expanded 8960,
   10240, 15360, 17920), bits 4 and 8 (plane order, as the W4A8 linear runs it), T = 1, 257 and
   1100 (> 1024: several tokens per program), codes vs ``hadamard_quant_reference`` (>= 99.9 %
   equal, the rest +-1), scales.
3. ``batch_invariance``: a token's codes / scale / sums / GEMM row alone and inside batches of
   T = 7, 64, 1100, bit for bit.
4. ``gemm``: W4A8 and W4A4, decode (M = 1, split-K), M = 17..64, large (M = 1100), grouped
   scales (g = 128), the plain-tl unpack (fast=False), against ``w4_gemm_reference``.
5. ``tp_amax``: the two-pass TP path (hadamard_absmax, cross-rank max, hadamard_quant_amax).
6. ``capture``: ``qexpand_linear_gpu`` under CUDA-graph capture and under ``torch.compile``.
7. ``jit``: what the JIT actually built: registers, spills, wgmma, per kernel specialization.
8. ``configs``: the large-M tile candidates (``CONFIG_CANDIDATES``) timed at 8B down, M = 4096.
9. ``ratios``: benchmarks/kernels.py rows (CUDA graphs, weights cycled over >= 256 MB) for the
   Llama-3.1-8B o / down / expanded down and Hadamard+quant at 14336 / 17920, as long as the
   budget lasts.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HADAMARD_SIZES = [(576, 576), (1536, 1536), (4096, 4096), (8192, 8192), (14336, 14336),
                  (8192, 8960), (8192, 10240), (14336, 15360), (14336, 17920)]

# the shapes of a run; SMALL (with DEV = "cpu" and TRITON_INTERPRET=1) is how the CPU test runs
# the checking steps' logic in Triton's interpreter
FULL = dict(hadamard_sizes=HADAMARD_SIZES, hq_tokens=(1, 257, 1100), gemm_nk=(1024, 4096), gemm_t=(1, 16, 17, 40, 64, 1100),
            odd_nk=(1000, 4000), big_t=1100, linear=(14336, 17920, 512), tp=(7168, 8960, 256), fast=True)
SMALL = dict(hadamard_sizes=[(448, 512), (1536, 1664)], hq_tokens=(1, 9), gemm_nk=(48, 256), gemm_t=(1, 5, 17),
             odd_nk=(40, 208), big_t=20, linear=(448, 512, 24), tp=(448, 576, 16), fast=False)
S = FULL
DEV = "cuda"


def _codes_agree(got, ref, bits) -> dict:
    from vllm_qexpand.kernels import hadamard_quant as hq

    g = hq.unpack_activation_int4(got) if bits == 4 else got
    r = hq.unpack_activation_int4(ref) if bits == 4 else ref
    d = (g.int() - r.int()).abs()
    return {"max_diff": int(d.max()), "equal_frac": float((d == 0).float().mean()),
            "ok": int(d.max()) <= 1 and float((d == 0).float().mean()) >= 0.999}


def step_env(ctx):
    import torch
    import triton

    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sms": p.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__,
            "capability": list(torch.cuda.get_device_capability()), "ok": True}


def step_hadamard(ctx):
    import torch

    from vllm_qexpand import hadamard
    from vllm_qexpand.kernels import hadamard_quant as hq

    rows = []
    for n, m in S["hadamard_sizes"]:
        if time.time() > ctx.get("deadline", float("inf")):
            return {"rows": rows, "ok": False, "cut_short": "budget spent"}
        k = hadamard.factor(m)[0]
        for bits in (4, 8):
            for t in S["hq_tokens"]:
                x = (torch.randn(t, n, device=DEV) * (torch.rand(t, 1, device=DEV) * 4 + 0.1)).to(torch.bfloat16)
                planes = bits == 8 and m % 64 == 0  # as qexpand_linear_gpu runs W4A8
                codes, scale, sums = hq.hadamard_quant(x, m, k, 1, bits, planes=planes)
                codes = hq.from_planes(codes) if planes else codes
                rc, rs, _ = hq.hadamard_quant_reference(x, m, k, 1, bits)
                agree = _codes_agree(codes, rc, bits)
                sdiff = float(((scale - rs).abs() / rs).max())
                rows.append({"N": n, "M": m, "k": k, "bits": bits, "T": t, **agree, "scale_rel": sdiff,
                             "ok": agree["ok"] and sdiff <= 1e-5})
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def _gemm_case(t, n, k, bits, group, fast, seed):
    import torch

    from vllm_qexpand import quant
    from vllm_qexpand.kernels import w4a8_gemm as gm

    g = torch.Generator().manual_seed(seed)
    wq = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, k // group if group else 1, generator=g) * 0.01 + 1e-3
    lim = 8 if bits == 4 else 128
    a = torch.randint(-lim, lim, (t, k), generator=g, dtype=torch.int8)
    asc = torch.rand(t, 1, generator=g) + 0.1
    asum = a.int().sum(1, dtype=torch.int32)
    wp = quant.pack_int4(wq)
    ref = gm.w4_gemm_reference(a, asc, wp, ws, group, torch.float64)
    c = lambda z: z.to(DEV)  # noqa: E731
    w = gm.repack_for_kernel(c(wp))
    if bits == 8:
        y = gm.w4a8_gemm(c(a), c(asc), c(asum), w, c(ws), group, torch.float32, config={"fast": fast})
    else:
        ap = c(quant.pack_int4(a).view(torch.uint8))
        y = gm.w4a4_gemm(ap, c(asc), c(asum), w, gm.weight_code_sums(c(wp)), c(ws), group, torch.float32, config={"fast": fast})
    err = float((y.cpu().double() - ref).abs().max() / ref.abs().max())
    return {"T": t, "N": n, "K": k, "bits": bits, "group": group, "fast": fast, "rel_err": err, "ok": err <= 1e-5}


def step_gemm(ctx):
    rows = []
    n, k = S["gemm_nk"]
    fast = S["fast"]
    for bits in (8, 4):
        for t in S["gemm_t"]:
            rows.append(_gemm_case(t, n, k, bits, 0, fast, t))
        rows.append(_gemm_case(S["gemm_t"][-1], n, k, bits, 128, fast, 7))
        rows.append(_gemm_case(S["big_t"], n, k, bits, 128, fast, 8))
        rows.append(_gemm_case(S["gemm_t"][-1], *S["odd_nk"], bits, 0, fast, 9))  # K, N not tile multiples
        for t in (1, S["big_t"]):
            rows.append(_gemm_case(t, n, k, bits, 0, False, t + 1))
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def _linear_setup(bits, m, out, seed=0):
    import torch

    from vllm_qexpand import hadamard, quant
    from vllm_qexpand.kernels import ops

    g = torch.Generator().manual_seed(seed)
    wq = torch.randint(-8, 8, (out, m), generator=g, dtype=torch.int8)
    ws = torch.rand(out, 1, generator=g) * 0.01 + 1e-3
    rot = (m, hadamard.factor(m)[0], 1)
    prepared = ops.prepare_weights(quant.pack_int4(wq).to(DEV), ws.to(DEV), rotation=rot, act_dtype=torch.bfloat16)
    return wq, ws, rot, prepared


def step_batch_invariance(ctx):
    import torch

    from vllm_qexpand.kernels import hadamard_quant as hq
    from vllm_qexpand.kernels import ops

    rows = []
    n_in, m, out = S["linear"]
    for bits in (4, 8):
        wq, ws, rot, p = _linear_setup(bits, m, out)
        pool = torch.randn(S["big_t"], n_in, device=DEV).to(torch.bfloat16)
        tok = pool[5:6]
        alone_q = hq.hadamard_quant(tok, rot[0], rot[1], 1, bits, p["hrow"], p["hcol"])
        alone_y = ops.qexpand_linear_gpu(tok, **p, act_bits=bits, rotation=rot)
        for t in (7, S["gemm_t"][-1], S["big_t"]):
            q = hq.hadamard_quant(pool[:t], rot[0], rot[1], 1, bits, p["hrow"], p["hcol"])
            y = ops.qexpand_linear_gpu(pool[:t], **p, act_bits=bits, rotation=rot)
            same = all(torch.equal(a[0], b[5]) for a, b in zip(alone_q, q)) and torch.equal(alone_y[0], y[5])
            rows.append({"bits": bits, "T": t, "ok": bool(same)})
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def step_tp_amax(ctx):
    import torch

    from vllm_qexpand import quant
    from vllm_qexpand.kernels import ops

    rows = []
    for bits in (4, 8):
        n_in, m, out = S["tp"]
        wq, ws, rot, p = _linear_setup(bits, m, out)
        x = torch.randn(33, n_in, device=DEV).to(torch.bfloat16)
        other = torch.rand(33, 1, device=DEV) * 3  # what the other ranks' max could be
        y = ops.qexpand_linear_gpu(x, **p, act_bits=bits, rotation=rot, amax_reduce=lambda a: torch.maximum(a, other))
        xr = quant.online_rotate(x.float(), *rot[:2], None, 1)
        amax = torch.maximum(xr.abs().amax(-1, keepdim=True), other)
        q, s = quant.quantize_activation(xr, bits, amax=amax)
        ref = ((q.double() @ wq.double().t().to(DEV)) * ws.double().to(DEV).reshape(1, -1)) * s.double()
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        rows.append({"bits": bits, "rel_err": err, "ok": err <= 1e-2})
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def step_capture(ctx):
    import torch

    from vllm_qexpand.kernels import ops

    rows = []
    n_in, m, out = S["linear"]
    for bits in (4, 8):
        wq, ws, rot, p = _linear_setup(bits, m, out)
        x = torch.randn(16, n_in, device="cuda").to(torch.bfloat16)
        eager = ops.qexpand_linear_gpu(x, **p, act_bits=bits, rotation=rot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.qexpand_linear_gpu(x, **p, act_bits=bits, rotation=rot)
        graph.replay()
        torch.cuda.synchronize()
        fn = torch.compile(lambda z: ops.qexpand_linear_gpu(z, **p, act_bits=bits, rotation=rot), fullgraph=True)
        yc = fn(x)
        rows.append({"bits": bits, "graph_equal": bool(torch.equal(eager, y)), "compile_equal": bool(torch.equal(eager, yc)),
                     "ok": bool(torch.equal(eager, y) and torch.equal(eager, yc))})
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def step_jit(ctx):
    """Registers / spills / wgmma of every kernel the JIT compiled in this process."""
    from vllm_qexpand.kernels import hadamard_quant as hq
    from vllm_qexpand.kernels import w4a8_gemm as gm

    rows = []
    for fn in (gm._w4_gemm_kernel, hq._hadamard_quant_kernel):
        for dev_cache in fn.device_caches.values():
            for kern in dev_cache[0].values():
                row = {"kernel": fn.__name__}
                try:
                    kern._init_handles()
                    ptx = kern.asm.get("ptx", "")
                    row.update(regs=kern.n_regs, spills=kern.n_spills, smem=kern.metadata.shared,
                               warps=kern.metadata.num_warps, wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                               cp_async="cp.async" in ptx, hash=kern.metadata.hash[:12])
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
    return {"rows": rows, "ok": True}


def step_ratios(ctx):
    import importlib.util

    spec = importlib.util.spec_from_file_location("qexpand_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)

    rows = [r for r in bk.plan_rows(("8b",), (1, 16, 64, 1024, 4096))
            if r["_layer"] in ("o", "down", "down_x17920") and r["kernel"] in ("w4a4", "w4a8", "linear_w4a4", "linear_w4a4_i8")]
    rows += [r for r in bk.plan_rows(("8b",), (16, 8192)) if r["kernel"] == "hadamard_quant4"]
    out = []
    for r in rows:
        if time.time() > ctx["deadline"]:
            return {"rows": out, "ok": True, "cut_short": f"budget spent after {len(out)} of {len(rows)} rows"}
        out.extend(bk.run([r], log=lambda s: print(" ", s, flush=True)))
        ctx["partial"](out)
    return {"rows": out, "ok": True}


# large-M tile candidates the static report could not decide between (docs/kernels.md)
CONFIG_CANDIDATES = [
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=2, split_k=1),  # the default: 81 instr/iter, 171 regs
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4, split_k=1),  # deeper prefetch: 93 instr/iter
    dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=2, split_k=1),  # 122 regs: several CTAs per SM overlap
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, split_k=1),
]


def step_configs(ctx):
    """W4A4 / W4A8 at Llama-3.1-8B down (N 4096, K 14336), M = 4096, under each candidate tile."""
    import importlib.util

    import torch

    from vllm_qexpand.kernels import w4a8_gemm as gm

    spec = importlib.util.spec_from_file_location("qexpand_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    m, n, k = 4096, 4096, 14336
    copies = bk.n_copies(n * k // 2)
    wq = [torch.randint(0, 2**31 - 1, (n, k // 8), device=DEV, dtype=torch.int32) for _ in range(copies)]
    w = [gm.repack_for_kernel(x) for x in wq]
    sums = [gm.weight_code_sums(x) for x in wq]
    ws = torch.rand(n, 1, device=DEV) * 0.01
    a4 = torch.randint(0, 256, (m, k // 2), device=DEV, dtype=torch.uint8)
    a8 = torch.randint(-128, 128, (m, k), device=DEV, dtype=torch.int8)
    asc, asum = torch.rand(m, 1, device=DEV), torch.randint(-1000, 1000, (m,), device=DEV, dtype=torch.int32)
    rows = []
    for cfg in CONFIG_CANDIDATES:
        if time.time() > ctx["deadline"]:
            break
        for kernel in ("w4a4", "w4a8"):
            if kernel == "w4a4":
                fns = [lambda i=i: gm.w4a4_gemm(a4, asc, asum, w[i], sums[i], ws, 0, torch.bfloat16, config=cfg) for i in range(copies)]
            else:
                fns = [lambda i=i: gm.w4a8_gemm(a8, asc, asum, w[i], ws, 0, torch.bfloat16, config=cfg) for i in range(copies)]
            try:
                ms = bk.bench_graph(fns)
                rows.append({"kernel": kernel, "M": m, "N": n, "K": k, "config": cfg, "ms": round(ms, 5),
                             "tops": round(2 * m * n * k / ms / 1e9, 1)})
            except Exception as e:  # noqa: BLE001
                rows.append({"kernel": kernel, "config": cfg, "error": f"{type(e).__name__}: {e}"})
            ctx["partial"](rows)
    return {"rows": rows, "ok": True}


STEPS = [("env", step_env), ("hadamard_quant", step_hadamard), ("batch_invariance", step_batch_invariance),
         ("gemm", step_gemm), ("tp_amax", step_tp_amax), ("capture", step_capture), ("jit", step_jit),
         ("configs", step_configs), ("ratios", step_ratios)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", nargs="+", default=None, help="only these steps")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("first_gpu_run.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from vllm_qexpand.kernels import HAS_TRITON, interpreting

    if not HAS_TRITON or interpreting():
        print("first_gpu_run.py needs compiled Triton (TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    t0 = time.time()
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    path = args.out or ROOT / "benchmarks" / "results" / f"first-gpu-run-{name}-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.date.today().isoformat(), "budget_s": args.budget, "steps": []}

    def write():
        doc["elapsed_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(doc, indent=1) + "\n")

    ctx = {"deadline": t0 + args.budget}
    for name_, fn in STEPS:
        if args.steps and name_ not in args.steps:
            continue
        s = time.time()
        entry = {"step": name_}
        doc["steps"].append(entry)
        if s > ctx["deadline"] and name_ != "env":  # never run past the budget (the GPU lease is short)
            entry.update(ok=False, skipped=f"budget of {args.budget:.0f} s spent")
            write()
            print(f"{name_}: skipped (budget spent)", flush=True)
            continue
        ctx["partial"] = lambda rows, entry=entry: (entry.update(rows=rows, partial=True), write())
        try:
            entry.update(fn(ctx))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            entry.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        entry.pop("partial", None)
        entry["seconds"] = round(time.time() - s, 1)
        write()
        print(f"{name_}: {'ok' if entry.get('ok') else 'FAILED'} ({entry['seconds']} s)", flush=True)
    print(f"wrote {path}")
    return 0 if all(e.get("ok") for e in doc["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
