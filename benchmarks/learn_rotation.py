"""Learned R1 (`qexpand convert --learn-rotation`) against the Hadamard it starts from, on SmolLM2-135M.

    python benchmarks/learn_rotation.py [--model models/smollm2-135m] [--seeds 0,1,2]
                                        [--configs learned,learned+expand-s3,rotation,...]
                                        [--learn-steps 100] [--work DIR] [--out JSON]
    python benchmarks/learn_rotation.py --table benchmarks/results/learn-rotation-<date>.json

For each R1 seed (random ±1 signs on the starting Hadamard): learn R1 once (`qexpand convert
--rtn --learn-rotation --seed S`, a subprocess: its wall time and peak RSS are the cost of the
option), then convert every other `learned*` config with that R1 (`--rotation DST/rotation/r1.safetensors`)
and every Hadamard config with the same seed, and score each in the torch reference: perplexity on
Pride and Prejudice, first 4096 tokens, windows of 512 (docs/accuracy.md's protocol). The learned R1
is learned without expansion in the loop and reused for the expansion rows. A learned conversion
kept in --work is reused, not learned again. W4A4 only. Rows are merged into --out (keyed by config
and seed), so configs can be measured in several invocations; the table shows each config's mean
over the seeds measured and every seed's number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_qexpand.converters.learn import ROTATION_FILE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import cli_flags  # noqa: E402  (the `qexpand convert` flags of a config)

# name -> converter options on top of W4A4. A name in LEARN_RUNS is a learning conversion of its own
# (`--rtn --learn-rotation` + its options); "RUN+X" converts with RUN's learned R1 (`--rotation`) and X's options.
CONFIGS = {
    "rotation": dict(),
    "expand-s1": dict(expand=[("down_proj", 1)]),
    "expand-s3": dict(expand=[("down_proj", 3)]),
    "rotation+gptq": dict(gptq=True),
    "learned": dict(),
    "learned+expand-s1": dict(expand=[("down_proj", 1)]),
    "learned+expand-s3": dict(expand=[("down_proj", 3)]),
    "learned+expand-s5": dict(expand=[("down_proj", 5)]),
    "learned+gptq": dict(gptq=True),
    "learned+expand-s3+gptq": dict(expand=[("down_proj", 3)], gptq=True),
    # learned with the expanded Hadamard in the loop (its own learning run), RTN
    "learned-with-expand-s3": dict(expand=[("down_proj", 3)]),
    # learned with float weights in the loop (W16A4, its own learning run), then GPTQ with that R1
    "learned-float-weights": dict(learn_weights="float"),
    "learned-float-weights+gptq": dict(gptq=True),
}


LEARN_RUNS = ("learned", "learned-with-expand-s3", "learned-float-weights")


def markdown_table(result: dict) -> str:
    fmt = lambda x: f"{x:.2f}"  # noqa: E731
    by = {}
    for r in result["rows"]:
        by.setdefault(r["config"], []).append(r)
    lines = ["| config | PPL (mean) | per seed | linear params | convert s |", "|---|---|---|---|---|"]
    for name in [c for c in CONFIGS if c in by]:
        rows = sorted(by[name], key=lambda r: r["seed"])
        per = ", ".join(f"s{r['seed']} {fmt(r['ppl'])}" for r in rows)
        secs = statistics.mean(r["convert_s"] for r in rows)
        lines.append(f"| {name} | {fmt(statistics.mean(r['ppl'] for r in rows))} | {per} | "
                     f"+{100 * rows[0]['param_overhead']:.1f}% | {secs:.0f} |")
    return "\n".join(lines)


def learn(model: Path, dst: Path, seed: int, steps: int, flags: list[str] = ()) -> dict:
    """Run `qexpand convert --rtn --learn-rotation [flags]` in a subprocess (unless dst holds one already)."""
    if not (dst / ROTATION_FILE).is_file():
        cmd = [sys.executable, "-m", "vllm_qexpand.cli", "convert", str(model), str(dst), "--rtn", "--learn-rotation",
               "--seed", str(seed), "--learn-steps", str(steps), "--force", "--quiet", *(f for f in flags if f != "--rtn")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        cost = {"wall_s": round(time.perf_counter() - t0, 1),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
        (dst / "learn_cost.json").write_text(json.dumps(cost) + "\n")
    report = json.loads((dst / "qexpand_report.json").read_text())
    cost_file = dst / "learn_cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    lr = report["learn_rotation"]
    return {"learn_s": lr["seconds"], "convert_s": report["timing"]["total_s"], "loss_first": lr["loss_first"],
            "loss_last": lr["loss_last"], "steps": lr["steps"], **cost}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--learn-steps", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=None, help="keep conversions here (learned ones are reused)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, metavar="JSON", help="print the table of an earlier run")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")

    from transformers import AutoTokenizer

    from vllm_qexpand.converters.pipeline import convert
    from vllm_qexpand.converters.state import Options
    from vllm_qexpand.eval.data import calibration_text, evaluation_text
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model

    ids = AutoTokenizer.from_pretrained(args.model)(evaluation_text())["input_ids"]
    work = args.work or Path(tempfile.mkdtemp(prefix="qexpand-learn-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    calib.write_text(calibration_text())
    out = args.out or ROOT / "benchmarks" / "results" / f"learn-rotation-{datetime.date.today().isoformat()}.json"
    result = {
        "benchmark": "learn_rotation", "date": datetime.date.today().isoformat(), "model": args.model.name,
        "torch": torch.__version__, "device": platform.machine(), "threads": torch.get_num_threads(),
        "scheme": "w4a4", "learn_steps": args.learn_steps,
        "ppl_protocol": f"Pride and Prejudice, first {args.ppl_tokens} tokens, windows of 512",
        "calibration": "the calibration books (eval.data.CALIBRATION_BOOKS): learning windows of 512 tokens in "
                       "order, GPTQ on the first 16", "rows": [],
    }
    if out.exists():
        result["rows"] = json.loads(out.read_text())["rows"]

    def save(row: dict) -> None:
        if out.exists():  # re-read: another invocation may have added rows since this one started
            result["rows"] = json.loads(out.read_text())["rows"]
        result["rows"] = [r for r in result["rows"] if (r["config"], r["seed"]) != (row["config"], row["seed"])]
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(row), flush=True)

    def score(path: Path) -> float:
        return round(perplexity(load_model(path), ids, 512, args.ppl_tokens, progress=False)["ppl"], 3)

    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        for name in configs:
            run, _, reuse = name.partition("+")
            if run in LEARN_RUNS:  # a learning conversion of its own (reused if --work holds it)
                dst = work / f"{run}-s{seed}"
                cost = learn(args.model, dst, seed, args.learn_steps, cli_flags(CONFIGS[run]))
            if run in LEARN_RUNS and not reuse:
                rep = json.loads((dst / "qexpand_report.json").read_text())
                save({"config": name, "seed": seed, "ppl": score(dst), "param_overhead": rep["param_overhead"], **cost})
                continue
            opts = dict(CONFIGS[name], progress=False, force=True, calib=calib, seed=seed)
            if run in LEARN_RUNS:
                opts.update(rotation=dst / ROTATION_FILE)
            out_dir = work / f"{name}-s{seed}"
            t0 = time.perf_counter()
            rep = convert(args.model, out_dir, Options(**opts))
            save({"config": name, "seed": seed, "ppl": score(out_dir), "param_overhead": rep["param_overhead"],
                  "convert_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                  "load": os.getloadavg()[0]})
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
