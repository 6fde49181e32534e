"""Static kernel report for sm_90a, without a GPU: registers, spills, wgmma, SASS per MMA-loop iteration.

    python benchmarks/kernel_sass.py                          # writes benchmarks/results/kernel-sass-<date>.json
    python benchmarks/kernel_sass.py --quick --out /tmp/q.json
    python benchmarks/kernel_sass.py --before old.json        # also records an earlier report's summary

Every configuration the dispatch picks for the Llama-3.2-1B / 3.1-8B linears (qkv, o, gate_up,
down, expanded down_proj K 8960, 10240, 15360, 17920) at M in {1, 16, 64, 1024, 4096}, for
W4A4 and W4A8, and the Hadamard+quant kernel at every planned size, compiled as the JIT
compiles them on a GPU (see ``vllm_qexpand/kernels/aot.py``, which does the work; the same as
``python -m vllm_qexpand.kernels.aot --report OUT``). The predicted ratios are an issue-rate /
bandwidth model, not measurements; each row carries its arithmetic under "prediction".
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _same_role(key: str, before: dict):
    """The earlier summary's entry for the same kernel, BM (decode / small / large tile) and split."""
    parts = key.split()
    if parts[0] == "hadamard_quant" or len(parts) < 3:
        return None
    for k, v in before.items():
        q = k.split()
        if q[0] == parts[0] and q[1].split("x")[0] == parts[1].split("x")[0] and q[2:] == parts[2:]:
            return v
    return None


def table(doc: dict) -> str:
    """Markdown table of a report's summary (docs/kernels.md), with the earlier report's counts if kept."""
    before = (doc.get("before") or {}).get("summary", {})
    lines = ["| configuration (after) | before | after | target |", "|---|---|---|---|"]
    for key, s in doc["summary"].items():
        if key.startswith("hadamard"):
            fmt = lambda x: (f"{x['instr_per_token']} instr/token/thread" + (f" x {x['warps']} warps" if "warps" in x else "")  # noqa: E731
                             + f", {x['spill_bytes']} B spill, {x['regs']} regs")
            goal = "<= 1000, 0 spill, >= 32-bit stores"
        else:
            fmt = lambda x: f"{x['instr_per_iter']} instr/iter, {x['prmt_per_iter']} PRMT, {x['spill_bytes']} B spill, {x['regs']} regs"  # noqa: E731
            goal = f"<= {s['limit']}, 0 PRMT, 0 spill"
        old = before.get(key) or _same_role(key, before)
        lines.append(f"| {key} | {fmt(old) if old else '-'} | {fmt(s)} | {'met' if s['target_met'] else 'MISSED'} ({goal}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two GEMM rows and one Hadamard size (CI)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--before", type=Path, default=None, help="an earlier report: its summary is kept under 'before'")
    ap.add_argument("--before-label", default="", help="what the earlier report measured (e.g. a commit)")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of this report and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles the kernels", file=sys.stderr)
        return 2
    from vllm_qexpand.kernels import aot

    doc = aot.report(quick=args.quick)
    if args.before:
        old = json.loads(args.before.read_text())
        doc["before"] = {"label": args.before_label, "summary": old["summary"]}
    out = args.out or ROOT / "benchmarks" / "results" / f"kernel-sass-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    met = sum(s["target_met"] for s in doc["summary"].values())
    for key, s in doc["summary"].items():
        print(f"{'MET ' if s['target_met'] else 'MISS'} {key}: " + " ".join(f"{a}={b}" for a, b in s.items() if a != "target_met"))
    print(f"{met}/{len(doc['summary'])} configurations meet the static targets; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
