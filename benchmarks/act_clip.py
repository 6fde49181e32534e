"""The activation clip sweep behind `--act-clip`'s W4A4 default (issue 14): perplexity per clip ratio.

    python benchmarks/act_clip.py --layouts r2,quarot --seeds none,0,1,2 --clips 1,0.8,0.75,0.7,0.65,0.6
    python benchmarks/act_clip.py --configs rotation+gptq --layouts r2 --seeds none --clips 1,0.8,0.7,0.6
    python benchmarks/act_clip.py --table benchmarks/results/act-clip-2026-11-30.json

Each (config, layout, R1 draw) is converted once (`qexpand convert` options of benchmarks/peers.py, W4A4,
`act_clip=1`: the clip changes no weight, GPTQ calibrates on float activations), then scored with every
clip ratio by setting the reference's QLinear.act_clip, on two texts:

- `eval`: the evaluation book (Pride and Prejudice, first 4096 tokens, windows of 512), as every table of
  docs/accuracy.md;
- `calib`: held-out calibration text, the 4096 tokens of the calibration books right after the 16 × 512
  that GPTQ calibrates on. The default is chosen on this text, so the evaluation book never picks it.

Converted checkpoints are kept in --work (reused when there; delete them after a converter change).
Rows merge into --out (benchmarks/results/act-clip-<date>.json). Never part of `make test`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def texts(model: Path) -> dict:
    from transformers import AutoTokenizer

    from peers import CALIB_LEN, CALIB_SAMPLES, PPL_TOKENS
    from vllm_qexpand.eval.data import calibration_text, evaluation_text

    tok = AutoTokenizer.from_pretrained(model)
    start = CALIB_SAMPLES * CALIB_LEN
    return {"eval": tok(evaluation_text())["input_ids"][:PPL_TOKENS],
            "calib": tok(calibration_text())["input_ids"][start:start + PPL_TOKENS]}


def score(model, ids: list[int], clip: float) -> float:
    from peers import PPL_TOKENS, WINDOW
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import QLinear

    for m in model.modules():
        if isinstance(m, QLinear):
            m.act_clip = clip
    return perplexity(model, ids, WINDOW, PPL_TOKENS, progress=False)["ppl"]


def convert_once(model: Path, work: Path, config: str, layout: str, seed: int | None) -> Path:
    from peers import CALIB_LEN, CALIB_SAMPLES, qexpand_options
    from vllm_qexpand.converters.calibrate import builtin_calibration_file
    from vllm_qexpand.converters.pipeline import convert
    from vllm_qexpand.converters.state import Options

    path = work / f"ck-{config}-{layout}-{seed}"
    if not path.exists():
        convert(model, path, Options(scheme="w4a4", act_clip=1.0, progress=False, calib=builtin_calibration_file(),
                                     calib_samples=CALIB_SAMPLES, calib_len=CALIB_LEN, seed=seed,
                                     **qexpand_options(config, layout)))
    return path


def table(doc: dict) -> str:
    """Per (config, layout, text): one line per clip, the perplexity of each R1 draw and their mean."""
    out = []
    keys = sorted({(r["config"], r["layout"], r["text"]) for r in doc["rows"]}, key=lambda k: (k[0], k[1], k[2] != "calib"))
    for config, layout, text in keys:
        rows = [r for r in doc["rows"] if (r["config"], r["layout"], r["text"]) == (config, layout, text)]
        seeds = sorted({r["seed"] for r in rows}, key=lambda s: -1 if s is None else s)
        by = {(r["clip"], r["seed"]): r["ppl"] for r in rows}
        names = ["Hadamard" if s is None else f"seed {s}" for s in seeds]
        out += [f"{config}, layout {layout}, {text} text:", "",
                "| clip | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(seeds) + 1)]
        clips = sorted({r["clip"] for r in rows}, reverse=True)
        means = {}
        for c in clips:
            v = [by.get((c, s)) for s in seeds]
            means[c] = sum(v) / len(v) if None not in v else None
        best = min((m, c) for c, m in means.items() if m is not None)[1] if any(means.values()) else None
        for c in clips:
            v = [by.get((c, s)) for s in seeds]
            mean = "—" if means[c] is None else (f"**{means[c]:.2f}**" if c == best else f"{means[c]:.2f}")
            out.append(f"| {c:g} | " + " | ".join("—" if x is None else f"{x:.2f}" for x in v) + f" | {mean} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    ap.add_argument("--configs", default="rotation", help="peers.py configs (default: rotation)")
    ap.add_argument("--layouts", default="r2", help="r2, quarot (default: r2)")
    ap.add_argument("--seeds", default="none,0,1,2", help="R1 draws: none = the plain Hadamard (default: none,0,1,2)")
    ap.add_argument("--clips", default="1,0.8,0.75,0.7,0.65,0.6")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qexpand-act-clip"), help="converted checkpoints (kept)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, metavar="JSON", help="print the tables of an earlier run")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from vllm_qexpand.eval.reference import load_model

    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"act-clip-{date}.json"
    doc = json.loads(out.read_text()) if out.exists() else {
        "benchmark": "act_clip", "model": args.model.name, "date": date, "torch": torch.__version__, "threads": 1,
        "scheme": "W4A4 (int4 weights per channel, MSE clip; int4 activations per token, symmetric, scale = "
                  "(max|x| * clip) / 7)", "texts": {
            "eval": "Pride and Prejudice, first 4096 tokens, windows of 512",
            "calib": "calibration books, the 4096 tokens after the 16 x 512 GPTQ calibrates on, windows of 512"},
        "rows": []}
    ids = texts(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [None if s.strip() == "none" else int(s) for s in args.seeds.split(",") if s.strip()]
    for config in args.configs.split(","):
        for layout in args.layouts.split(","):
            for seed in seeds:
                t0 = time.perf_counter()
                model = load_model(convert_once(args.model, args.work, config, layout, seed))
                rows = []
                for clip in [float(c) for c in args.clips.split(",")]:
                    for text in ("calib", "eval"):
                        rows.append(dict(tool="qexpand", config=config, layout=layout, seed=seed, clip=clip, text=text,
                                         ppl=round(score(model, ids[text], clip), 3)))
                        print(json.dumps(rows[-1]), flush=True)
                doc["rows"] = [r for r in doc["rows"] if (r["config"], r["layout"], r["seed"], r["clip"], r["text"])
                               not in {(x["config"], x["layout"], x["seed"], x["clip"], x["text"]) for x in rows}] + rows
                doc.setdefault("seconds", {})[f"{config} {layout} {seed}"] = round(time.perf_counter() - t0, 1)
                out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
