"""lm-eval (``local-completions``) and ``qexpand eval --url`` on the same served model and the same items.

    python benchmarks/lm_eval_compare.py models/smollm2-135m-w4a16            # starts the server itself
    python benchmarks/lm_eval_compare.py DIR --url http://127.0.0.1:8000/v1 --tasks piqa,arc_easy --limit 500

1. The items of each task (``eval.data.load_task``: PIQA validation, ARC-Easy validation, ...; the
   first ``--limit``) are written to ``--work``/<task>.jsonl, with an lm-eval task file
   ``qx_<task>.yaml`` next to them that reads that JSONL with the ``json`` builder of ``datasets``
   (no hub): ``doc_to_text: "{{context}}"``, ``doc_to_choice: "{{choices}}"``, ``doc_to_target:
   label``, ``target_delimiter: " "``, metrics ``acc`` and ``acc_norm``: the prompts of lm-eval's own
   ``piqa`` / ``arc_easy`` tasks ("Question: ...\\nAnswer:"), which ``eval.data`` also uses.
2. Without ``--url`` the model is served with ``python -m vllm_qexpand.serve DIR`` (float32, loopback,
   plus ``--server-args``). Needs ``pip install "lm-eval[api]"`` (the API models need tenacity, aiohttp).
3. ``lm_eval --model local-completions --model_args model=...,base_url=URL/completions,
   tokenizer_backend=huggingface,tokenizer=DIR --tasks qx_... --include_path WORK --log_samples``,
   unchanged, in a subprocess.
4. The project's harness on the same items: ``eval.served.ServedScorer(URL)`` with
   ``eval.zeroshot.score_items(..., details=True)`` (what ``qexpand eval DIR --url URL`` runs).
5. Per task: both accuracies (acc, acc_norm), the items whose prediction differs, and the largest
   difference of a choice's summed log-likelihood, matched item by item from lm-eval's samples file.

Writes ``--out`` (default benchmarks/results/lm-eval-vs-qexpand-<date>.json) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from soak import free_port, launch_server, stop_server  # benchmarks/soak.py, beside this script

ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """task: qx_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_DATASETS_OFFLINE"] = "1"  # local files only
    env["HF_HUB_OFFLINE"] = "1"
    return env


def write_tasks(tasks: list[str], limit: int | None, work: Path) -> dict[str, list[dict]]:
    from vllm_qexpand.eval.data import load_task, save_task_jsonl

    work.mkdir(parents=True, exist_ok=True)
    items = {}
    for t in tasks:
        items[t] = load_task(t, limit)
        data = save_task_jsonl(items[t], work / f"{t}.jsonl")
        (work / f"qx_{t}.yaml").write_text(TASK_YAML.format(task=t, data=Path(data).resolve()))
    return items


def start_server(model: Path, log: Path, max_model_len: int, extra: list[str]):
    server_args = ["--host", "127.0.0.1", "--port", str(free_port()), "--dtype", "float32",
                   "--max-model-len", str(max_model_len), "--max-num-seqs", "16",
                   "--kv-cache-memory-bytes", str(512 << 20), "--seed", "0", *extra]  # fmt: skip
    proc, fh, base = launch_server(model, server_args, log, _env())
    return proc, fh, base + "/v1"


def run_lm_eval(model_dir: Path, url: str, served: str, tasks: list[str], work: Path, batch_size: int) -> dict:
    out = work / "lm-eval"
    model_args = (f"model={served},base_url={url}/completions,tokenizer_backend=huggingface,tokenizer={model_dir},"
                  "num_concurrent=1,max_retries=3,tokenized_requests=True")  # fmt: skip
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", ",".join(f"qx_{t}" for t in tasks), "--include_path", str(work), "--batch_size",
           str(batch_size), "--output_path", str(out), "--log_samples"]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    (work / "lm-eval.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"lm_eval failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    samples = {}
    for t in tasks:
        f = sorted(out.rglob(f"samples_qx_{t}_*.jsonl"))[-1]
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        samples[t] = {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}
    return {"cmd": cmd, "results": results["results"], "samples": samples, "seconds": time.monotonic() - t0,
            "version": results.get("lm_eval_version") or results.get("versions")}  # fmt: skip


def run_harness(model_dir: Path, url: str, items: dict[str, list[dict]]) -> dict:
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.served import ServedScorer
    from vllm_qexpand.eval.zeroshot import score_items

    tok = AutoTokenizer.from_pretrained(model_dir)
    scorer = ServedScorer(url)
    out = {}
    t0 = time.monotonic()
    for t, its in items.items():
        out[t] = score_items(its, scorer, tok, progress=False, desc=t, details=True)
    return {"results": out, "seconds": time.monotonic() - t0, "served_model": scorer.model}


def compare(items, lm, ours) -> dict:
    import math

    rows = {}
    for t, its in items.items():
        mine = ours["results"][t]
        theirs = lm["results"][f"qx_{t}"]
        n_diff_pred = n_diff_norm = 0
        max_dll = 0.0
        for i, (it, row) in enumerate(zip(its, mine["items"])):
            lls = lm["samples"][t][i]
            max_dll = max(max_dll, max(abs(a - b) for a, b in zip(lls, row["lls"])))
            pred = max(range(len(lls)), key=lambda k: (lls[k], -k))
            norm = max(range(len(lls)), key=lambda k: (lls[k] / len(it["choices"][k]), -k))
            n_diff_pred += pred != row["pred"]
            n_diff_norm += norm != row["pred_norm"]
        rows[t] = {
            "n": mine["n"],
            "lm_eval": {"acc": theirs["acc,none"], "acc_stderr": theirs.get("acc_stderr,none"),
                        "acc_norm": theirs["acc_norm,none"], "acc_norm_stderr": theirs.get("acc_norm_stderr,none")},
            "qexpand": {k: mine[k] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "items_with_other_acc_prediction": n_diff_pred,
            "items_with_other_acc_norm_prediction": n_diff_norm,
            "max_abs_loglikelihood_diff": max_dll if math.isfinite(max_dll) else None,
        }  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the model directory (the tokenizer; served unless --url)")
    ap.add_argument("--url", default=None, help="a running server's /v1 URL (default: serve MODEL here)")
    ap.add_argument("--tasks", default="piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval --batch_size (prompts per request)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--server-args", default="", help="more `vllm serve` arguments, e.g. --enforce-eager")
    ap.add_argument("--work", type=Path, default=ROOT / "models" / "lm-eval-compare")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    tasks = [t for t in args.tasks.split(",") if t]
    items = write_tasks(tasks, args.limit, args.work)
    proc = fh = None
    url = args.url
    if url is None:
        proc, fh, url = start_server(args.model, args.work / "server.log", args.max_model_len,
                                     shlex.split(args.server_args))
    try:
        served = json.loads(urllib.request.urlopen(url + "/models", timeout=30).read())["data"][0]["id"]
        lm = run_lm_eval(args.model, url, served, tasks, args.work, args.batch_size)
        ours = run_harness(args.model, url, items)
    finally:
        if proc is not None:
            stop_server(proc, fh)
    import importlib.metadata as md

    rows = compare(items, lm, ours)
    date = dt.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"lm-eval-vs-qexpand-{date}.json"
    result = {"date": date, "model": str(args.model), "tasks": tasks, "limit": args.limit,
              "lm_eval_version": md.version("lm_eval"), "lm_eval_cmd": lm["cmd"],
              "lm_eval_seconds": round(lm["seconds"], 1), "qexpand_seconds": round(ours["seconds"], 1),
              "server_args": args.server_args if args.url is None else None, "url": args.url,
              "rows": rows, "note": args.note}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| task | n | lm-eval acc | qexpand acc | lm-eval acc_norm | qexpand acc_norm | items predicted "
          "differently (acc / acc_norm) | max abs Δ log-likelihood |")
    print("|---|---|---|---|---|---|---|---|")
    for t, r in rows.items():
        print(f"| {t} | {r['n']} | {r['lm_eval']['acc']:.4f} | {r['qexpand']['acc']:.4f} | "
              f"{r['lm_eval']['acc_norm']:.4f} | {r['qexpand']['acc_norm']:.4f} | "
              f"{r['items_with_other_acc_prediction']} / {r['items_with_other_acc_norm_prediction']} | "
              f"{r['max_abs_loglikelihood_diff']:.2e} |")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
