"""The evaluation harness behind ``qexpand eval``: perplexity and zero-shot tasks of one model,
in the torch reference or served, as one result dict and a Markdown table.

- reference: ``eval.reference.load_model(model_dir)`` (an HF dir, or a qexpand dir run with the
  exact quantized math) scored by ``eval.zeroshot.HFScorer``;
- served: ``eval.served.ServedScorer(url, served_model)``; ``model_dir`` only gives the tokenizer.

Both go through the same code (``eval.perplexity.perplexity``, ``eval.zeroshot.evaluate_tasks``),
so their results differ only by the model's numbers.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from pathlib import Path

from .data import TASKS


def check_tasks(tasks: Sequence[str], task_files: Sequence[str | Path] = ()) -> list[str]:
    """Task names (``eval.data.TASKS``) then task files (``.jsonl``/``.jsonl.gz``), checked before any model loads."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}; one of {', '.join(TASKS)} (or --task-file F.jsonl)")
    out = list(tasks)
    for f in task_files:
        f = str(f)
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such task file")
        if not f.endswith((".jsonl", ".jsonl.gz")):
            raise ValueError(f"{f}: a task file is .jsonl or .jsonl.gz (one {{context, choices, label}} a line)")
        out.append(f)
    return out


def make_scorer(model_dir: str | Path, *, url: str | None = None, served_model: str | None = None,
                served_api: str = "prompt_logprobs", dtype: str = "float32", timeout: float = 600.0):
    """``(scorer, description dict)`` for the torch reference of ``model_dir`` or the server at ``url``."""
    if url:
        from .served import ServedScorer

        scorer = ServedScorer(url, served_model, api=served_api, timeout=timeout)
        return scorer, {"backend": "served", "url": scorer.url, "served_model": scorer.model, "served_api": served_api,
                        "max_model_len": scorer.max_model_len}
    import torch

    from .reference import load_model
    from .zeroshot import HFScorer

    model = load_model(model_dir, getattr(torch, dtype))
    return HFScorer(model), {"backend": "reference", "dtype": dtype}


def evaluate(model_dir: str | Path, *, text: str | Path | None = None, window: int = 512,
             max_tokens: int | None = 8192, tasks: Sequence[str] = (), limit: int | None = None,
             scorer=None, progress: bool = True, **scorer_kw) -> dict:
    """Perplexity of ``text`` (if given) and zero-shot results of ``tasks`` (names or .jsonl paths).

    The tokenizer is ``model_dir``'s. ``scorer``: use this one instead of ``make_scorer(model_dir, **scorer_kw)``.
    Perplexity keys (``ppl, nll, tokens, window, windows``) are at the top level, tasks under ``tasks``.
    """
    from transformers import AutoTokenizer

    from .perplexity import perplexity
    from .zeroshot import evaluate_tasks

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    if text is not None and not Path(text).is_file():
        raise FileNotFoundError(f"{text}: no such text file")
    if text is None and not tasks:
        raise ValueError("nothing to evaluate: give --text FILE and/or --tasks / --task-file")
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" of from_pretrained
    tok = AutoTokenizer.from_pretrained(model_dir)
    result: dict = {"model": str(model_dir), "date": datetime.date.today().isoformat()}
    if scorer is None:
        scorer, desc = make_scorer(model_dir, **scorer_kw)
        result.update(desc)
    timing = {}
    if text is not None:
        t0 = time.perf_counter()
        ids = tok(Path(text).read_text(encoding="utf-8"))["input_ids"]
        result["text"] = str(text)
        result.update(perplexity(scorer, ids, window, max_tokens or None, progress=progress))
        result["max_tokens"] = max_tokens or None
        timing["perplexity_s"] = round(time.perf_counter() - t0, 2)
    if tasks:
        t0 = time.perf_counter()
        result["limit"] = limit
        result["tasks"] = evaluate_tasks(scorer, tok, list(tasks), limit=limit, progress=progress)
        timing["tasks_s"] = round(time.perf_counter() - t0, 2)
    result["timing"] = timing
    return result


def _pm(value: float, err: float | None) -> str:
    if err is None or err != err:  # nan: one item
        return f"{value:.4f}"
    return f"{value:.4f} ± {err:.4f}"


def to_markdown(result: dict) -> str:
    """One table: a perplexity row (if any), then one row per task."""
    if result.get("backend") == "served":
        how = f"served `{result.get('served_model')}` at {result.get('url')} ({result.get('served_api')})"
    elif result.get("backend") == "reference":
        how = f"torch reference, {result.get('dtype')}"
    else:
        how = "custom scorer"
    lines = [f"**{result.get('model')}**: {how}", "", "| task | n | acc | acc_norm | ppl |", "|---|---:|---:|---:|---:|"]
    if "ppl" in result:
        lines.append(f"| perplexity `{Path(result['text']).name}` (window {result['window']}) | {result['tokens']} tokens "
                     f"| | | {result['ppl']:.4f} |")
    for name, r in (result.get("tasks") or {}).items():
        label = Path(name).name if name not in TASKS else name
        acc = _pm(r["acc"], r.get("acc_stderr"))
        norm = _pm(r["acc_norm"], r.get("acc_norm_stderr")) if "acc_norm" in r else ""
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else ""
        lines.append(f"| {label} | {r['n']} | {acc} | {norm} | {ppl} |")
    return "\n".join(lines) + "\n"
