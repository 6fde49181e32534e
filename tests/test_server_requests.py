"""Bad, edge and abandoned requests against `python -m vllm_qexpand.serve` (issue 16).

One server for the module: the tiny w4a4 checkpoint with online o_proj/down_proj rotations and
down_proj expanded, in vLLM's **default compile mode** (not eager), float32, --max-model-len 256,
--max-num-batched-tokens 96 (so a long prompt is prefilled in chunks of at most 96 tokens).

- Every malformed request (invalid JSON, unknown model, too long a prompt, max_tokens 0 / huge,
  empty prompt, out-of-vocabulary token ids, logprobs over the limit, negative temperature, ...)
  gets a 4xx with vLLM's message, and the next valid request gets the same greedy text as the
  first one did.
- A client that drops its connection in the middle of a stream: the engine aborts its sequences and
  frees their slots, and the server answers the next request the same way.
- Bad requests fired while a valid stream is running do not change that stream's text.
- Token counts the engine hands our linear: a 1-token prompt, an odd one (7), a 250-token prompt
  prefilled in chunks of 96 + 96 + 58 next to decode steps: prompt log-probs and greedy tokens as
  the torch reference, and nothing is compiled or recompiled after start-up.
- The server log shows no error or traceback (while it is up) and the engine process never died.
"""
import http.client
import json
import re
import socket
import struct
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")

from server import openai_server  # noqa: E402
from tiny import reference_outputs  # noqa: E402

pytestmark = pytest.mark.slow
OPTIONS = dict(scheme="w4a4", online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
NAME = "tiny-qexpand"
MAX_MODEL_LEN = 256
CHUNK = 96  # --max-num-batched-tokens
GOOD = {"model": NAME, "prompt": "It is a truth universally acknowledged", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}  # fmt: skip


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    path = serve_models("w4a4-exp", **OPTIONS)
    log = tmp_path_factory.mktemp("server-requests") / "server.log"
    args = ("--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(CHUNK))
    # TORCH_LOGS=recompiles: torch logs any Dynamo recompilation in the worker
    with openai_server(path, log, *args, eager=False, env={"TORCH_LOGS": "recompiles"}) as (base, proc):
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        started = log.read_text()
        yield {"base": base, "proc": proc, "log": log, "path": path, "vocab": vocab, "startup_log": started}


def post(server, body=None, raw=None, path="/v1/completions", timeout=120):
    """(HTTP status, parsed JSON or the raw text) of one POST."""
    host, port = server["base"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        r = conn.getresponse()
        text = r.read().decode("utf-8", errors="replace")
    finally:
        conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


def metrics(server) -> str:
    with urllib.request.urlopen(server["base"] + "/metrics", timeout=30) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`."""
    total = 0.0
    for ln in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", ln)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def baseline(server):
    status, body = post(server, GOOD)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 8
    return body["choices"][0]["text"]


def assert_still_serves(server, baseline):
    status, body = post(server, GOOD)
    assert status == 200, body
    assert body["choices"][0]["text"] == baseline
    assert server["proc"].poll() is None


# (name, body or None, raw body or None, expected status, fragment of the error message)
BAD = [
    ("invalid_json", None, '{"model": "tiny-qexpand", "prompt": ', 400, "JSON decode error"),
    ("body_not_an_object", None, "[1, 2, 3]", 400, "valid dictionary"),
    ("unknown_model", {**GOOD, "model": "no-such-model"}, None, 404, "The model `no-such-model` does not exist"),
    ("prompt_ids_longer_than_max_model_len", {**GOOD, "prompt": [5] * (MAX_MODEL_LEN + 10)}, None, 400,
     "maximum context length is 256 tokens"),
    ("prompt_text_longer_than_max_model_len", {**GOOD, "prompt": "hello " * 2000}, None, 400,
     "maximum context length is 256 tokens"),
    ("max_tokens_0", {**GOOD, "max_tokens": 0}, None, 400, "max_tokens must be at least 1"),
    ("max_tokens_negative", {**GOOD, "max_tokens": -5}, None, 400, "max_tokens must be at least 1"),
    ("max_tokens_huge", {**GOOD, "max_tokens": 10**9}, None, 400, "cannot be greater than max_model_len=256"),
    ("max_tokens_not_a_number", {**GOOD, "max_tokens": "ten"}, None, 400, "valid integer"),
    ("empty_prompt", {**GOOD, "prompt": ""}, None, 400, "non-empty"),
    ("empty_prompt_ids", {**GOOD, "prompt": []}, None, 400, "at least one prompt"),
    ("token_id_out_of_vocabulary", {**GOOD, "prompt": [1, 2, "VOCAB+5"]}, None, 400, "out of vocabulary"),
    ("token_id_negative", {**GOOD, "prompt": [1, -3, 2]}, None, 400, "greater than or equal to 0"),
    ("logprobs_over_limit", {**GOOD, "logprobs": 21}, None, 400, "greater than max allowed: 20"),
    ("logprobs_huge", {**GOOD, "logprobs": 10**6}, None, 400, "greater than max allowed: 20"),
    ("prompt_logprobs_over_limit", {**GOOD, "prompt_logprobs": 10**6}, None, 400, "greater than max allowed: 20"),
    ("temperature_negative", {**GOOD, "temperature": -1.0}, None, 400, "temperature must be non-negative"),
    ("top_p_zero", {**GOOD, "top_p": 0}, None, 400, "top_p must be in (0, 1]"),
    ("n_zero", {**GOOD, "n": 0}, None, 400, "n must be at least 1"),
]


def _resolve(server, body):
    if body is None:
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and "VOCAB+5" in prompt:
        body = {**body, "prompt": [server["vocab"] + 5 if t == "VOCAB+5" else t for t in prompt]}
    return body


@pytest.mark.parametrize("name,body,raw,want_status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_and_next_request_is_unchanged(server, baseline, name, body, raw, want_status, fragment):
    status, answer = post(server, _resolve(server, body), raw)
    assert status == want_status, (status, answer)
    message = answer["error"]["message"] if isinstance(answer, dict) else answer
    assert fragment in message, message
    assert_still_serves(server, baseline)


def test_max_tokens_up_to_the_context_is_served(server, baseline):
    """The largest max_tokens that fits (prompt + max_tokens = max_model_len) is served in full."""
    prompt = [7] * 16
    status, body = post(server, {**GOOD, "prompt": prompt, "max_tokens": MAX_MODEL_LEN - len(prompt)})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(prompt)
    assert body["choices"][0]["finish_reason"] == "length"
    assert_still_serves(server, baseline)


def test_max_tokens_past_the_context_is_cut_at_max_model_len(server, baseline):
    """vLLM 0.32 does not refuse prompt + max_tokens > max_model_len (when each alone fits): it
    generates until the context is full and reports finish_reason "length"."""
    prompt = [5] * 200
    status, body = post(server, {**GOOD, "prompt": prompt, "max_tokens": 100})
    assert status == 200, body
    assert body["usage"] == {**body["usage"], "prompt_tokens": 200, "completion_tokens": MAX_MODEL_LEN - 200}
    assert body["choices"][0]["finish_reason"] == "length"
    assert_still_serves(server, baseline)


def _stream(server, body, keep_chunks=None, first_chunk: threading.Event | None = None):
    """Stream a completion over a raw socket. Returns ([(choice index, text) per data chunk], saw [DONE],
    time.monotonic() at the end); with `keep_chunks=k` the connection is closed after k chunks (a client
    that goes away). `first_chunk` is set when the first chunk arrives."""
    host, port = server["base"][len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    r = conn.getresponse()
    assert r.status == 200, r.read()[:500]
    chunks, done = [], False
    try:
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[len("data: "):])["choices"][0]
            chunks.append((choice["index"], choice["text"]))
            if first_chunk is not None:
                first_chunk.set()
            if keep_chunks is not None and len(chunks) >= keep_chunks:
                break
    finally:
        if conn.sock is not None and keep_chunks is not None:  # go away at once: RST, not an orderly FIN
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    return chunks, done, time.monotonic()


def _texts(chunks) -> dict[int, str]:
    out = {}
    for i, t in chunks:
        out[i] = out.get(i, "") + t
    return out


def test_stream_ends_cleanly_with_the_same_text(server, baseline):
    chunks, done, _ = _stream(server, GOOD)
    assert done
    assert _texts(chunks) == {0: baseline}


def test_client_disconnect_mid_stream_aborts_the_request(server, baseline):
    """64 prompts x 248 tokens streamed (4 waves of --max-num-seqs 16); the client reads 3 chunks and
    closes the socket. The engine aborts what is left (not all 64 finish, fewer than 64 x 248 tokens are
    generated) and frees the slots; vLLM 0.32 counts aborted requests nowhere in
    vllm:request_success_total, finished ones there."""
    m = metrics(server)
    finished, generated = metric(m, "vllm:request_success_total"), metric(m, "vllm:generation_tokens_total")
    prompt, new_tokens, n = [11] * 8, MAX_MODEL_LEN - 8, 64
    chunks, done, _ = _stream(server, {**GOOD, "prompt": [prompt] * n, "max_tokens": new_tokens}, keep_chunks=3)
    assert len(chunks) == 3 and not done
    deadline = time.monotonic() + 60
    while True:  # the server notices the closed socket, aborts the requests and frees their slots
        m = metrics(server)
        if metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0:
            break
        assert time.monotonic() < deadline, "the abandoned requests still run after 60 s"
        time.sleep(0.2)
    time.sleep(1)
    m = metrics(server)
    assert metric(m, "vllm:request_success_total") - finished < n
    assert metric(m, "vllm:generation_tokens_total") - generated < n * new_tokens
    assert_still_serves(server, baseline)


def test_bad_requests_during_a_stream_leave_it_unchanged(server, baseline):
    """64 prompts x 240 tokens streamed (4 waves of --max-num-seqs 16: 2 waves ended a few ms before the
    first bad answer once, on a quiet machine); once the first chunk is in, every bad request of BAD is
    sent (the first answer comes back before the stream ends); the stream's texts equal the same
    request's non-streamed answer."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, server["vocab"], (8,), generator=g).tolist() for _ in range(64)]
    body = {**GOOD, "prompt": prompts, "max_tokens": 240}
    status, solo = post(server, body)
    assert status == 200, solo
    want = {c["index"]: c["text"] for c in solo["choices"]}
    result, started = {}, threading.Event()
    t = threading.Thread(target=lambda: result.update(zip(("chunks", "done", "t_end"),
                                                          _stream(server, body, first_chunk=started))))  # fmt: skip
    t.start()
    assert started.wait(120)
    codes, first_answer = [], None
    for _, b, raw, _, _ in BAD:
        codes.append(post(server, _resolve(server, b), raw)[0])
        first_answer = first_answer or time.monotonic()
    t.join(timeout=300)
    assert not t.is_alive()
    assert all(400 <= c < 500 for c in codes), codes
    assert result["done"]
    assert first_answer < result["t_end"], "the stream ended before any bad request was answered"
    assert _texts(result["chunks"]) == want
    assert_still_serves(server, baseline)


def test_token_counts_1_odd_and_chunked_prefill_match_reference(server):
    """Prompts of 1, 7 and 250 tokens in one request: the 250-token prefill is split into chunks of
    <= 96 tokens (int8 GEMM for the full chunks, dense for the rest) scheduled with the others' decode."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, server["vocab"], (n,), generator=g).tolist() for n in (1, 7, 250)]
    new_tokens = 4
    status, body = post(server, {"model": NAME, "prompt": prompts, "max_tokens": new_tokens, "temperature": 0,
                                 "ignore_eos": True, "prompt_logprobs": 0, "return_token_ids": True})  # fmt: skip
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda c: c["index"])
    ref_lps, ref_greedy = reference_outputs(server["path"], prompts, new_tokens)
    for p, c, want_lp, want_greedy in zip(prompts, choices, ref_lps, ref_greedy):
        got_lp = torch.tensor([e[str(t)]["logprob"] for t, e in zip(p[1:], c["prompt_logprobs"][1:])])
        assert got_lp.shape == want_lp.shape == (len(p) - 1,)
        if len(p) > 1:
            assert (got_lp - want_lp).abs().mean() <= 1e-3, (len(p), (got_lp - want_lp).abs().max())
        assert c["token_ids"] == want_greedy, len(p)


def test_no_graph_compiled_after_startup(server):
    """vLLM's CPU default (Dynamo trace-once, Inductor) compiled the model once, at start-up, for every
    token count up to 96; the requests above (1, 7, chunks of 96 and 58 tokens, decode batches of 1-16)
    ran on it: no recompilation (TORCH_LOGS=recompiles) or compile message after start-up."""
    assert server["proc"].poll() is None
    log = server["log"].read_text()
    started = server["startup_log"]
    assert log.startswith(started)
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in started and "enforce_eager=False" in started
    assert "Warming up model for the compilation" in started
    assert not [ln for ln in log.splitlines() if re.search(r"[Rr]ecompil", ln)]
    after = log[len(started):].splitlines()
    assert not [ln for ln in after if re.search(r"[Cc]ompil|[Ww]arming up", ln)], after


def test_server_log_has_no_error(server):
    assert server["proc"].poll() is None
    lines = server["log"].read_text().splitlines()
    bad = [ln for ln in lines if re.search(r"\bERROR\b|Traceback|EngineDeadError", ln)]
    assert not bad, bad[:20]
    statuses = [int(m.group(1)) for ln in lines if (m := re.search(r'"POST /v1/completions HTTP/1.1" (\d{3})', ln))]
    assert statuses and not [s for s in statuses if s >= 500], statuses
