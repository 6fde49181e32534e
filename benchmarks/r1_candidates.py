"""Does `--r1-candidates` pick a good R1? Its held-out calibration losses against each draw's evaluation perplexity.

    qexpand convert models/smollm2-135m /tmp/r1c8-rtn --rtn --r1-candidates 8
    qexpand convert models/smollm2-135m /tmp/r1c8-gptq --r1-candidates 8
    python benchmarks/peers.py --tools qexpand --configs rotation --layouts r2 --seeds none,0,1,2,3,4,5,6,7 --out draws.json
    python benchmarks/r1_candidates.py --draws draws.json --checkpoints /tmp/r1c8-rtn /tmp/r1c8-gptq

Reads each checkpoint's ``qexpand_report.json`` (``r1_candidates``: the loss of every draw, the chosen seed) and
scores the checkpoint with peers.py's protocol (Pride and Prejudice, first 4096 tokens, windows of 512); the
round-to-nearest draws of ``--draws`` (peers.py rows, one per seed) give each draw's evaluation perplexity, so
the JSON shows whether the held-out loss ranks the draws as the evaluation book does (Spearman's rho).
Writes benchmarks/results/r1-candidates-<date>.json. Never part of `make test`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=Path, nargs="+", required=True, help="peers.py JSONs with rotation/r2 rows per seed")
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="conversions made with --r1-candidates")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from transformers import AutoTokenizer

    import peers
    from vllm_qexpand.eval.data import evaluation_text

    torch.set_num_threads(1)
    peers._EVAL_IDS[:] = AutoTokenizer.from_pretrained(args.model)(evaluation_text())["input_ids"]
    draws = {}
    for path in args.draws:
        for r in json.loads(path.read_text())["rows"]:
            if (r["tool"], r["config"], r["layout"]) == ("qexpand", "rotation", "r2") and r.get("seed") is not None:
                draws[r["seed"]] = {"ppl": r["ppl"], "act_clip": r.get("act_clip")}
    doc = {"benchmark": "r1_candidates", "date": datetime.date.today().isoformat(), "model": args.model.name,
           "draws_eval_ppl": {str(s): d for s, d in sorted(draws.items())}, "checkpoints": []}
    for ck in args.checkpoints:
        report = json.loads((ck / "qexpand_report.json").read_text())
        rc = report["r1_candidates"]
        entry = {"path": str(ck), "recipe": report["recipe"], "chosen": rc["chosen"], "losses": rc["losses"],
                 "choose_r1_s": report["timing"]["setup_s"].get("choose_r1"),
                 "ppl": round(peers.score_qexpand(ck), 3)}
        seeds = [int(s) for s in rc["losses"] if int(s) in draws]
        if len(seeds) >= 3 and "round-to-nearest" in report["recipe"]:
            entry["spearman_loss_vs_eval_ppl"] = round(spearman([rc["losses"][str(s)] for s in seeds],
                                                                [draws[s]["ppl"] for s in seeds]), 3)
            entry["draws_compared"] = seeds
        doc["checkpoints"].append(entry)
        print(json.dumps(entry), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"r1-candidates-{doc['date']}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
