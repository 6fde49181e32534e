"""Compile the Triton kernels for a CUDA target without a GPU (ahead of time, via ptxas).

    python -m vllm_qexpand.kernels.aot [--arch 90] [--quick] [--ptxas-info]

Catches what the CPU interpreter cannot: lowering errors, inline PTX, ``tf32x3``, shared
memory over the 227 KiB an H100 CTA may use. Prints one line per configuration (shared
memory, whether wgmma / mma.sync were used; with ``--ptxas-info`` registers and spills).
Needs compiled Triton: TRITON_INTERPRET must be unset when this module is imported.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

SMEM_LIMIT = 232448  # bytes per CTA on sm_90 (227 KiB)


def _compile(fn, signature: dict, constexprs: dict, arch: int, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def gemm_cases(quick: bool):
    """(name, kwargs) of W4 GEMM configurations to compile."""
    from .w4a8_gemm import _CONFIGS

    cases = []
    for packed in (False, True):
        for key, (bm, bn, bk, warps, stages) in _CONFIGS.items():
            for fast in (True, False):
                split = 4 if key == "decode" else 1
                cases.append((f"w4a{4 if packed else 8} {key} {bm}x{bn}x{bk} split={split} fast={fast}",
                              dict(packed=packed, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, split=split, fast=fast, group=0)))
        cases.append((f"w4a{4 if packed else 8} grouped 128x128x64",
                      dict(packed=packed, bm=128, bn=128, bk=64, warps=8, stages=4, split=1, fast=True, group=128)))
    if quick:  # split-K mma.sync path (W4A8) and the wgmma path with packed activations (W4A4)
        cases = [c for c in cases if c[0].startswith(("w4a8 decode", "w4a4 large")) and c[1]["fast"]]
    return cases


def hadamard_cases(quick: bool):
    """(name, (size, k, bits)) of activation-kernel configurations to compile."""
    sizes = [(4096, 1), (14336, 28), (17920, 140), (8960, 140), (1664, 52), (15360, 60), (4096, 0)]
    cases = [(f"hadamard_quant{bits} M={m} k={k}", (m, k, bits)) for m, k in sizes for bits in (8, 4)]
    return [c for c in cases if c[1] == (14336, 28, 4)] if quick else cases


def compile_all(arch: int = 90, quick: bool = False, ptxas_info: bool = False, log=print) -> list[dict]:
    from . import HAS_TRITON, interpreting
    from . import hadamard_quant as hq
    from . import w4a8_gemm as gm

    if not HAS_TRITON or interpreting():
        raise RuntimeError("ahead-of-time compilation needs compiled Triton (TRITON_INTERPRET unset at import)")
    results = []
    for name, c in gemm_cases(quick):
        sig = {"a_ptr": "*u8" if c["packed"] else "*i8", "as_ptr": "*fp32", "asum_ptr": "*i32", "w_ptr": "*u8",
               "wsum_ptr": "*i32", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*i32",
               "M": "i32", "N": "i32", "K": "i32", "K_SLICE": "i32", "stride_am": "i32", "stride_wn": "i32",
               "stride_ws": "i32", "stride_om": "i32"}
        const = dict(A_PACKED=c["packed"], GROUP=c["group"], HAS_BIAS=True, SPLIT_K=c["split"], BM=c["bm"], BN=c["bn"],
                     BK=c["bk"], GROUP_M=8, FAST=c["fast"])
        results.append(_report(name, lambda: _compile(gm._w4_gemm_kernel, sig, const, arch, num_warps=c["warps"],
                                                      num_stages=c["stages"]), ptxas_info, arch, log))
    for name, (m, k, bits) in hadamard_cases(quick):
        pl = hq.plan(m, k, 1)
        sig = {"x_ptr": "*bf16", "hrow_ptr": "*fp32", "hcol_ptr": "*bf16", "q_ptr": "*i8" if bits == 8 else "*u8",
               "scale_ptr": "*fp32", "sum_ptr": "*i32", "T": "i32", "N_BLK": "i32", "M_BLK": "i32", "stride_x": "i32",
               "stride_q": "i32", "inv_sqrt": "fp32"}
        const = dict(NB=pl.blocks, R=pl.r, RB=pl.rb, P2=pl.p2, PB=pl.pb, ROWS=pl.rows, RC=min(pl.rows, 32),
                     ROTATE=pl.rotate, DOT_F32=False, PREC="tf32x3", BITS=bits, TOKENS=4)
        results.append(_report(name, lambda: _compile(hq._hadamard_quant_kernel, sig, const, arch,
                                                      num_warps=hq._num_warps(pl), num_stages=1), ptxas_info, arch, log))
    return results


def _report(name, build, ptxas_info, arch, log) -> dict:
    try:
        k = build()
    except Exception as e:  # noqa: BLE001 - reported per configuration
        log(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}")
        return {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    ptx = k.asm["ptx"]
    res = {"name": name, "ok": k.metadata.shared <= SMEM_LIMIT, "smem": k.metadata.shared,
           "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx}
    if ptxas_info:
        res.update(_ptxas_info(ptx, arch))
    log(f"{name}: {'ok' if res['ok'] else 'TOO MUCH SHARED MEMORY'} " + " ".join(f"{a}={b}" for a, b in res.items() if a not in ("name", "ok")))
    return res


def _ptxas_info(ptx: str, arch: int) -> dict:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):  # the newest one that accepts the PTX version
            r = subprocess.run([os.path.join(bindir, exe), f"-arch=sm_{arch}a", "-v", path, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                out = r.stdout + r.stderr
                regs = re.search(r"Used (\d+) registers", out)
                spills = re.search(r"(\d+) bytes spill stores", out)
                return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None}
    return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="a few configurations only (CI)")
    ap.add_argument("--ptxas-info", action="store_true", help="also report registers and spills")
    args = ap.parse_args(argv)
    res = compile_all(args.arch, args.quick, args.ptxas_info)
    bad = [r["name"] for r in res if not r["ok"]]
    print(f"{len(res) - len(bad)}/{len(res)} configurations compiled within limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
