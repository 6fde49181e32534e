"""Zero-shot multiple-choice scoring by log-likelihood (lm-eval's protocol, written small).

Items are in the common format of ``eval.data``: ``{context, choices, label}`` and an
optional ``delimiter`` (default ``" "``). For every choice the continuation
``delimiter + choice`` is tokenized after the context as lm-eval does (``encode_pair``:
encode ``context + continuation`` and ``context`` without special tokens, and keep the
tail; trailing spaces of the context move to the continuation), then a *scorer* gives its
summed log-probability and whether it is the greedy continuation.

- ``acc``: the choice with the highest summed log-likelihood is the label;
- ``acc_norm``: the same after dividing each log-likelihood by the UTF-8 byte length of
  the choice (lm-eval divides by ``len(choice)``, the same for ASCII text);
- one-choice items (LAMBADA): ``acc`` is the exact greedy match of the continuation, and
  ``ppl`` is ``exp(-mean log-likelihood)`` over the items, as lm-eval reports.

A scorer is any callable ``scorer(context_tokens, continuation_tokens) -> (sum_logprob,
is_greedy)``, so the same code scores an HF model, the torch reference of a qexpand
checkpoint, or a served model. A scorer may also have ``batch(pairs) -> [(sum_logprob,
is_greedy), ...]``; it is then called once per item with all its choices.
``HFScorer(model)`` is that callable for any ``torch.nn.Module`` causal LM that maps
``input_ids`` to logits (an HF ``...ForCausalLM``, ``eval.reference.load_model(dir)``);
``eval.served.ServedScorer(url)`` is the same for a model served by vLLM. Both also have
``token_logprobs(ids) -> [log p(ids[i] | ids[:i]) for i >= 1]``, which
``eval.perplexity.perplexity`` uses, and both cut a sequence longer than ``max_length + 1``
tokens the same way (``truncate_pair``).

    python -m vllm_qexpand.eval.zeroshot MODEL_DIR [--tasks piqa,arc_easy,...] [--limit N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .data import DEFAULT_DELIMITER, check_items, load_task

Scorer = Callable[[Sequence[int], Sequence[int]], "tuple[float, bool]"]


# --------------------------------------------------------------------------- tokenization

def _encode_fn(tokenizer) -> Callable[[str], list[int]]:
    """``tokenizer`` is an HF tokenizer (encoded without special tokens) or a ``str -> ids`` callable."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_tokens_to_ids"):
        return lambda s: list(tokenizer.encode(s, add_special_tokens=False))
    if callable(tokenizer):
        return lambda s: list(tokenizer(s))
    raise TypeError(f"expected an HF tokenizer or a callable str -> token ids, got {type(tokenizer).__name__}")


def _prefix_token(tokenizer) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return 0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval does.

    An empty context becomes ``[bos]`` (or ``[eos]``) so that the first continuation token
    has something to be predicted from.
    """
    encode = _encode_fn(tokenizer)
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context) if context else []
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encoding
        cont = encode(continuation)
    else:
        cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    if not ctx:
        ctx = [_prefix_token(tokenizer)]
    return ctx, cont


# --------------------------------------------------------------------------- scoring

def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best  # first of ties, like numpy


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def score_items(items: list[dict], scorer: Scorer, tokenizer, *, progress: bool = True,
                desc: str | None = None, details: bool = False) -> dict:
    """Score ``items`` with ``scorer``; returns ``{n, acc, acc_stderr[, acc_norm, acc_norm_stderr][, ppl]}``.

    ``acc_norm`` is given when some item has several choices, ``ppl`` when all have one.
    With ``details=True`` the result also has ``items``: per item the log-likelihoods,
    the greedy flags and the two predictions.
    """
    check_items(items)
    if not items:
        raise ValueError("no items to score")
    batch = getattr(scorer, "batch", None)
    n_acc = n_norm = 0
    single_ll: list[float] = []
    multi = False
    rows = []
    for it in tqdm(items, desc=desc or "zero-shot", unit="item", disable=not progress):
        delim = it.get("delimiter", DEFAULT_DELIMITER)
        pairs = [encode_pair(tokenizer, it["context"], delim + c) for c in it["choices"]]
        scored = list(batch(pairs)) if batch is not None else [scorer(ctx, cont) for ctx, cont in pairs]
        lls = [float(s[0]) for s in scored]
        greedy = [bool(s[1]) for s in scored]
        label = it["label"]
        if len(lls) == 1:
            pred = pred_norm = 0 if greedy[0] else -1
            single_ll.append(lls[0])
        else:
            multi = True
            pred = _argmax(lls)
            pred_norm = _argmax([ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, it["choices"])])
        n_acc += pred == label
        n_norm += pred_norm == label
        if details:
            rows.append({"lls": lls, "greedy": greedy, "pred": pred, "pred_norm": pred_norm, "label": label})
    n = len(items)
    out = {"n": n, "acc": n_acc / n, "acc_stderr": _stderr(n_acc / n, n)}
    if multi:
        out.update(acc_norm=n_norm / n, acc_norm_stderr=_stderr(n_norm / n, n))
    else:
        out["ppl"] = math.exp(-sum(single_ll) / len(single_ll))
    if details:
        out["items"] = rows
    return out


def evaluate_tasks(scorer: Scorer, tokenizer, tasks: Sequence[str] = ("piqa", "arc_easy", "arc_challenge", "lambada"),
                   limit: int | None = None, progress: bool = True, details: bool = False) -> dict:
    """``{task: score_items(...)}`` for task names of ``eval.data.TASKS`` (or ``.jsonl`` paths)."""
    return {t: score_items(load_task(t, limit), scorer, tokenizer, progress=progress, desc=t, details=details)
            for t in tasks}


# --------------------------------------------------------------------------- torch models

def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if logits is None:
        raise TypeError(f"the model returned {type(output).__name__}, with no logits")
    return logits


def truncate_pair(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """``(sequence, n)``: ``ctx + cont`` cut to its last ``max_length + 1`` tokens (a model input
    of ``max_length`` tokens predicts every token after the first), and how many of its last
    tokens are the continuation (a continuation longer than the window loses its head)."""
    if not cont:
        raise ValueError("empty continuation")
    seq = (list(ctx) + list(cont))[-(max_length + 1):]
    return seq, min(len(cont), len(seq) - 1)


class HFScorer:
    """The scorer of a torch causal LM: ``model(input_ids)`` gives logits ``[batch, seq, vocab]``
    (or an output with ``.logits``). Sequences longer than ``max_length`` lose their left end,
    as in lm-eval. Set the model's dtype, device and ``eval()`` mode before."""

    def __init__(self, model: torch.nn.Module, max_length: int | None = None, device=None, max_batch: int = 8):
        self.model = model
        if max_length is None:
            cfg = getattr(model, "config", None)
            max_length = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length)
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.max_batch = max_batch

    def _window(self, ctx: Sequence[int], cont: Sequence[int]) -> list[int]:
        return truncate_pair(ctx, cont, self.max_length)[0][:-1]  # model input: predicts every token after the first

    @torch.inference_mode()
    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """``log p(ids[i] | ids[:i])`` for ``i = 1 .. len(ids) - 1``, in one forward pass (no truncation)."""
        x = torch.tensor([list(ids)], device=self.device)
        logp = torch.log_softmax(_logits(self.model(x))[0, :-1].float(), dim=-1)
        return logp.gather(1, x[0, 1:, None])[:, 0].tolist()

    @torch.inference_mode()
    def __call__(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[float, bool]:
        return self.batch([(ctx, cont)])[0]

    @torch.inference_mode()
    def batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Several (context, continuation) pairs, right-padded into batches of ``max_batch``.

        Right padding needs no attention mask: under causal attention a real token never
        sees the padding after it."""
        out = []
        for s in range(0, len(pairs), self.max_batch):
            chunk = pairs[s:s + self.max_batch]
            inputs = [self._window(c, t) for c, t in chunk]
            width = max(len(x) for x in inputs)
            pad = inputs[0][0]
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self.device)
            logits = _logits(self.model(ids))
            for row, x, (_, cont) in zip(logits, inputs, chunk):
                n = min(len(cont), len(x))  # a continuation longer than the window loses its head
                cont = list(cont)[len(cont) - n:]
                logp = torch.log_softmax(row[len(x) - n:len(x)].float(), dim=-1)
                target = torch.tensor(list(cont), device=logp.device)
                ll = logp.gather(1, target[:, None]).sum().item()
                out.append((ll, bool((logp.argmax(-1) == target).all())))
        return out


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Zero-shot accuracy of an HF or qexpand directory (torch reference)")
    ap.add_argument("model", type=Path)
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,lambada")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from .reference import load_model

    tok = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    res = evaluate_tasks(HFScorer(model), tok, args.tasks.split(","), limit=args.limit)
    for t, r in res.items():
        extra = f"acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else f"ppl {r['ppl']:.2f}"
        print(f"{t:20s} n={r['n']:5d}  acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}  {extra}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "limit": args.limit, "tasks": res}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
