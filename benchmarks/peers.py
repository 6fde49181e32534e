"""Peer benchmark: Brevitas 0.13.4 (the expansion authors' code, its QuaRot* recipe) against
`qexpand convert`, same model, calibration windows and perplexity protocol, one JSON.

    python benchmarks/peers.py --brevitas-python /work/brevitas-venv/bin/python \\
        [--model models/smollm2-135m] [--configs rotation,expand-s3] [--layouts r2,quarot]
        [--seeds 0,1,2] [--tools qexpand,brevitas] [--out FILE]
    python benchmarks/peers.py --table benchmarks/results/peers-<date>.json

Brevitas is an optional extra (`pip install -e .[peers]`), best kept in a venv of its own since it
pins other versions:

    python3 -m venv /work/brevitas-venv
    /work/brevitas-venv/bin/pip install "brevitas[llm,hadamard]==0.13.4" "torch==2.13.0"

It runs in a subprocess with that interpreter (benchmarks/peers_brevitas_driver.py); this
process never imports brevitas. Both tools get:

- calibration: the first 16 x 512 tokens of the built-in calibration text
  (converters/calibrate.py `builtin_calibration_file()` / `tokens()`), used by GPTQ only;
- evaluation: Pride and Prejudice, first 4096 tokens, windows of 512, every token after the first
  of each window (eval/perplexity.py), on the quantized model in float32 (ours: the torch
  reference of `eval.reference.load_model`; Brevitas: its fake-quantized model in
  `quant_inference_mode`); each tool's float model is scored too (22.366 in both);
- W4A4: int4 weights per output channel, symmetric, MSE scale search; int4 activations per token,
  symmetric, dynamic.

Configs: rotation (RTN), rotation+gptq (GPTQ act-order, 1% damping), expand-sN (down_proj
expanded by N size-rule steps, RTN), expand-s3+gptq. Layouts: r2 (ours: R1 + per-head R2 fused,
online Hadamard on down_proj) and quarot (R1 fused, online Hadamard on o_proj and down_proj).
Seeds: R1 random-sign seeds for ours (`convert --seed S`); without --seeds, R1 is the plain
Hadamard. Brevitas's fused rotation is the plain Hadamard (not seedable): its rows have seed null.

Writes benchmarks/results/peers-<date>.json (rows of an existing file are kept unless re-run)
and prints a Markdown table, both tools side by side. Never part of `make test`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "peers_brevitas_driver.py"

# name -> (GPTQ?, expansion of down_proj in size-rule steps or None)
CONFIGS = {
    "rotation": (False, None),
    "rotation+gptq": (True, None),
    "expand-s1": (False, 1),
    "expand-s3": (False, 3),
    "expand-s5": (False, 5),
    "expand-s3+gptq": (True, 3),
}
LAYOUTS = {"r2": ("down_proj",), "quarot": ("down_proj", "o_proj")}  # layout -> our online layers
TOOLS = ("qexpand", "brevitas")
CALIB_SAMPLES, CALIB_LEN, PPL_TOKENS, WINDOW = 16, 512, 4096, 512


def qexpand_options(config: str, layout: str) -> dict:
    """`Options` fields (on top of scheme w4a4) for one config and layout; GPTQ is the CLI's default
    recipe (act-order, 1% damping, sequential inside each layer)."""
    gptq, steps = CONFIGS[config]
    opts = dict(online=LAYOUTS[layout], gptq=gptq)
    if gptq:
        opts["sequential"] = True
    if steps:
        opts["expand"] = [("down_proj", steps)]
    return opts


def qexpand_flags(config: str, layout: str, seed: int | None) -> list[str]:
    """The `qexpand convert` command-line flags of `qexpand_options` (+ --seed)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from accuracy import cli_flags  # here, not at import: accuracy.py imports torch, and main() sets threads first

    return cli_flags({**qexpand_options(config, layout), **({} if seed is None else {"seed": seed})})


def overrides_label(overrides: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))


def row_key(row: dict) -> tuple:
    return row["tool"], row["config"], row["layout"], row.get("seed"), overrides_label(row.get("overrides"))


def parse_overrides(items: list[str]) -> dict:
    """--brevitas-set KEY=VALUE (VALUE read as JSON when it parses: true, 8, "x"; else a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--brevitas-set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of `old` not re-measured in `new`, then `new` (a re-run replaces its earlier row)."""
    keys = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in keys] + list(new)


def merge_results(results: list[dict]) -> dict:
    """One result of several runs: the first one's header, every run's float perplexities and rows (merge_rows)."""
    out = dict(results[0], rows=[], float_ppl={})
    for r in results:
        out["float_ppl"].update(r.get("float_ppl", {}))
        out["rows"] = merge_rows(out["rows"], r.get("rows", []))
    return out


def markdown_table(result: dict) -> str:
    """One line per (config, layout, R1), both tools side by side; then Brevitas's A/B rows
    (recipe changes from --brevitas-set) against its own recipe."""
    allrows = result["rows"]
    rows = [r for r in allrows if not r.get("overrides")]
    order = {c: i for i, c in enumerate(CONFIGS)}
    lorder = {c: i for i, c in enumerate(LAYOUTS)}
    by = {row_key(r)[:4]: r for r in rows}
    lines_keys = sorted({(r["config"], r["layout"], r.get("seed")) for r in rows},
                        key=lambda k: (order.get(k[0], 99), k[0], lorder.get(k[1], 9), -1 if k[2] is None else k[2]))
    head = ["config", "layout", "R1", "qexpand PPL", "Brevitas PPL", "qexpand params", "Brevitas params",
            "qexpand s", "Brevitas s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fl = result.get("float_ppl", {})
    if fl:
        out.append("| float | — | — | " + " | ".join(f"{fl[t]:.3f}" if t in fl else "—" for t in TOOLS)
                   + " | — | — | — | — |")

    def cell(row, key, fmt):
        return "—" if row is None or row.get(key) is None else fmt(row[key])

    for config, layout, seed in lines_keys:
        q, b = by.get(("qexpand", config, layout, seed)), by.get(("brevitas", config, layout, seed))
        r1 = "Hadamard" if seed is None else f"seed {seed}"
        ppl = lambda r: cell(r, "ppl", lambda x: f"{x:.2f}")  # noqa: E731
        par = lambda r: cell(r, "param_overhead", lambda x: f"+{100 * x:.1f}%")  # noqa: E731
        sec = lambda r: cell(r, "seconds", lambda x: f"{x:.0f}")  # noqa: E731
        out.append(f"| {config} | {layout} | {r1} | {ppl(q)} | {ppl(b)} | {par(q)} | {par(b)} | {sec(q)} | {sec(b)} |")
    out += mean_table(result)
    ab = sorted((r for r in allrows if r.get("overrides")),
                key=lambda r: (order.get(r["config"], 99), lorder.get(r["layout"], 9), overrides_label(r["overrides"])))
    if ab:
        out += ["", "| config | layout | Brevitas recipe change | Brevitas PPL | its recipe |", "|---|---|---|---|---|"]
        for r in ab:
            base = by.get(("brevitas", r["config"], r["layout"], r.get("seed")))
            out.append(f"| {r['config']} | {r['layout']} | `{overrides_label(r['overrides'])}` | {r['ppl']:.2f} | "
                       f"{cell(base, 'ppl', lambda x: f'{x:.2f}')} |")
    return "\n".join(out)


def mean_table(result: dict) -> list[str]:
    """Ours over R1 draws (configs with >= 2 draws): mean, spread and the share of its rotation-only gap to the
    float model each config closes (item 6 of issue 14), beside Brevitas's (one draw: its plain Hadamard)."""
    rows = [r for r in result["rows"] if not r.get("overrides")]
    fl = result.get("float_ppl", {})
    draws: dict = {}
    for r in rows:
        if r["tool"] == "qexpand":
            draws.setdefault((r["config"], r["layout"]), []).append(r["ppl"])
    brev = {(r["config"], r["layout"]): r["ppl"] for r in rows if r["tool"] == "brevitas"}
    keys = [k for k, v in draws.items() if len(v) >= 2]
    if not keys:
        return []
    order = {c: i for i, c in enumerate(CONFIGS)}
    lorder = {c: i for i, c in enumerate(LAYOUTS)}

    def closed(ppl, base, float_ppl):
        return "—" if base is None or float_ppl is None or base == float_ppl else f"{100 * (base - ppl) / (base - float_ppl):+.1f}%"

    out = ["", "| config | layout | qexpand R1 draws | qexpand mean PPL (min–max) | gap closed vs rotation | "
               "Brevitas PPL | gap closed vs rotation |", "|---|---|---|---|---|---|---|"]
    for config, layout in sorted(keys, key=lambda k: (order.get(k[0], 99), lorder.get(k[1], 9))):
        v = draws[(config, layout)]
        mean = sum(v) / len(v)
        base = "rotation+gptq" if "gptq" in config else "rotation"  # the row each config's gap is measured against
        base_q = draws.get((base, layout)) if config != base else None
        base_q = sum(base_q) / len(base_q) if base_q else None
        b = brev.get((config, layout))
        base_b = brev.get((base, layout)) if config != base else None
        out.append(f"| {config} | {layout} | {len(v)} | {mean:.2f} ({min(v):.2f}–{max(v):.2f}) | "
                   f"{closed(mean, base_q, fl.get('qexpand'))} | {'—' if b is None else f'{b:.2f}'} | "
                   f"{'—' if b is None else closed(b, base_b, fl.get('brevitas'))} |")
    return out


def data_windows(model: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration windows, evaluation windows) exactly as the converter and the harness build them."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from vllm_qexpand.converters.calibrate import builtin_calibration_file, tokens
    from vllm_qexpand.eval.data import evaluation_text
    from vllm_qexpand.eval.perplexity import windows

    state = SimpleNamespace(src=model, options=SimpleNamespace(
        calib=builtin_calibration_file(), calib_samples=CALIB_SAMPLES, calib_len=CALIB_LEN))
    calib = tokens(state, "peers").tolist()
    ids = AutoTokenizer.from_pretrained(model)(evaluation_text())["input_ids"]
    return calib, windows(ids, WINDOW, PPL_TOKENS)


def run_qexpand(model: Path, config: str, layout: str, seed: int | None, work: Path) -> dict:
    import shutil

    from vllm_qexpand.converters.calibrate import builtin_calibration_file
    from vllm_qexpand.converters.pipeline import convert
    from vllm_qexpand.converters.state import Options

    path = work / f"qexpand-{config}-{layout}-{seed}"
    opts = Options(scheme="w4a4", force=True, progress=False, calib=builtin_calibration_file(),
                   calib_samples=CALIB_SAMPLES, calib_len=CALIB_LEN, seed=seed, **qexpand_options(config, layout))
    t0 = time.perf_counter()
    report = convert(model, path, opts)
    seconds = time.perf_counter() - t0
    ppl = score_qexpand(path)
    shutil.rmtree(path, ignore_errors=True)
    from vllm_qexpand.converters.quantize import act_clip_of

    return dict(ppl=round(ppl, 3), param_overhead=report["param_overhead"], seconds=round(seconds, 1),
                act_clip=act_clip_of(opts), flags=qexpand_flags(config, layout, seed))


_EVAL_IDS: list[int] = []


def score_qexpand(path: Path) -> float:
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model

    return perplexity(load_model(path), _EVAL_IDS, WINDOW, PPL_TOKENS, progress=False)["ppl"]


def run_brevitas(python: str, model: Path, config: str, layout: str, calib, evalw, work: Path,
                 overrides: dict | None = None) -> dict:
    gptq, steps = CONFIGS[config]
    job = dict(model=str(model), calib=calib, eval=evalw, layout=layout, gptq=gptq,
               expand=["down_proj", steps] if steps else None, threads=1, overrides=overrides or {})
    job_path, out_path = work / f"job-{config}-{layout}.json", work / f"out-{config}-{layout}.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(DRIVER), str(job_path), str(out_path)], env=env, cwd=work)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"Brevitas driver failed (rc {proc.returncode}) for {config}/{layout}")
    out = json.loads(out_path.read_text())
    out["process_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    ap.add_argument("--configs", default="rotation")
    ap.add_argument("--layouts", default="r2,quarot")
    ap.add_argument("--seeds", default="", help="R1 seeds for ours, 'none' = the plain Hadamard (default: plain "
                                                "Hadamard only, like Brevitas), e.g. none,0,1,2")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--brevitas-python", default=sys.executable,
                    help="interpreter of a venv with brevitas[llm,hadamard]==0.13.4 (default: this one)")
    ap.add_argument("--brevitas-set", action="append", default=[], metavar="KEY=VALUE",
                    help="A/B: change one of Brevitas's quantize_llm args (by dest name, e.g. input_narrow_range=true); "
                         "the row is kept apart from the recipe's rows")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, metavar="JSON", help="print the table of an earlier run and exit")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="merge the rows of these runs (e.g. run side by side on two cores) into --out, print the "
                         "table and exit; a later file's row replaces an earlier one's")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out")
        merged = merge_results([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        print(markdown_table(merged))
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    configs = [c for c in args.configs.split(",") if c]
    layouts = [c for c in args.layouts.split(",") if c]
    tools = [t for t in args.tools.split(",") if t]
    for name, known in ((configs, CONFIGS), (layouts, LAYOUTS), (tools, TOOLS)):
        bad = [x for x in name if x not in known]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {list(known)}")
    seeds = [None if s.strip() == "none" else int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    overrides = parse_overrides(args.brevitas_set)
    if overrides and "qexpand" in tools:
        raise SystemExit("--brevitas-set changes Brevitas's recipe only: pass --tools brevitas")

    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"peers-{date}.json"
    result = {
        "benchmark": "peers", "model": args.model.name,
        "text": f"Pride and Prejudice (eval.data.EVALUATION_BOOKS), first {PPL_TOKENS} tokens, windows of {WINDOW}, "
                "every token after the first of each window",
        "calibration": f"built-in calibration text (Emma + Mansfield Park), first {CALIB_SAMPLES} x {CALIB_LEN} tokens",
        "scheme": "W4A4: int4 weights per output channel, symmetric, MSE scale; int4 activations per token, symmetric, dynamic",
        "date": date, "device": platform.machine(), "torch": torch.__version__, "threads": 1,
        "float_ppl": {}, "rows": [],
    }
    if out.exists():
        old = json.loads(out.read_text())
        result["rows"] = old.get("rows", [])
        result["float_ppl"] = old.get("float_ppl", {})
        for key, value in old.items():
            result.setdefault(key, value)

    def save(rows: list[dict]) -> None:
        result["rows"] = merge_rows(result["rows"], rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    calib, evalw = data_windows(args.model)
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.data import evaluation_text

    _EVAL_IDS[:] = AutoTokenizer.from_pretrained(args.model)(evaluation_text())["input_ids"]
    work = Path(tempfile.mkdtemp(prefix="qexpand-peers-"))
    try:
        if "qexpand" in tools:
            result["float_ppl"]["qexpand"] = round(score_qexpand(args.model), 3)
            save([])
        for config in configs:
            for layout in layouts:
                if "qexpand" in tools:
                    for seed in seeds:
                        r = run_qexpand(args.model, config, layout, seed, work)
                        row = dict(tool="qexpand", config=config, layout=layout, seed=seed, **r)
                        print(json.dumps(row), flush=True)
                        save([row])
                if "brevitas" in tools:
                    r = run_brevitas(args.brevitas_python, args.model, config, layout, calib, evalw, work, overrides)
                    result["float_ppl"]["brevitas"] = r["float_ppl"]
                    row = dict(tool="brevitas", config=config, layout=layout, seed=None,
                               **({"overrides": overrides} if overrides else {}),
                               **{k: r.get(k) for k in ("ppl", "param_overhead", "seconds", "float_ppl",
                                                    "eval_seconds", "process_seconds", "online_layer0", "quantized",
                                                    "brevitas", "recipe")})
                    print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
                    save([row])
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
