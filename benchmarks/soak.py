"""Soak run: the OpenAI server under steady load from vLLM's own client, for a fixed time.

    python benchmarks/soak.py                            # 30 min at concurrency 64, SmolLM2-135M W4A4
    python benchmarks/soak.py --duration 600 --note "shared cores: ..."

What it does:

1. The model: ``--model`` (default models/smollm2-135m; fetched with ``qexpand fetch smollm2-135m``
   when missing), converted with ``--convert-args`` (default ``--scheme w4a4 --expand down_proj=1``:
   W4A4, online Hadamard on down_proj, expanded one step) into ``--work`` (cached).
2. The server: ``python -m vllm_qexpand.serve DST`` on a free loopback port, float32, vLLM's default
   compile mode, ``--max-num-seqs`` = the concurrency, ``--kv-cache-memory-bytes`` ``--kv-cache-gib``,
   ``--max-model-len`` 512, seed 0; its log goes to ``--work``/soak-server.log.
3. The load: ``vllm bench serve`` (vLLM's benchmark client, run through ``vllm_qexpand.serve.vllm_cli``,
   which works on the CPU wheel), backend ``vllm`` (``/v1/completions``, streaming), random dataset
   (``--input-len`` / ``--output-len`` tokens, ``--range-ratio`` spread, ``--ignore-eos``), request rate
   inf with ``--max-concurrency`` 64, in **rounds**: each round is one ``vllm bench serve`` run with a
   fixed number of prompts (a new dataset seed per round), sized from the previous round's rate to take
   about ``--round-s`` seconds; no round starts after ``--duration`` seconds, the last one is sized to
   end near it, and every round has a hard timeout. Loopback only; the request count and time are
   bounded.
4. Every ``--sample-s`` seconds (default 60): the resident set size (RSS) of the server's process tree
   (API server, engine core, worker; summed and per process), the 1-minute load average and the CPU
   seconds used by processes that are not this run (the contention of a shared machine).

Output (``--out``, default benchmarks/results/soak-<date>.json)::

    {"date", "device", "vllm", "torch", "model", "convert_args", "server_args", "client_args",
     "duration_s", "concurrency", "sent", "completed", "failed", "errors" (distinct messages, counted),
     "output_tokens", "output_tok_s", "request_s",
     "ttft_ms": {"mean", "p50", "p90", "p99", "max"}, "tpot_ms": {...}, "e2el_ms": {...},
     "rss_mib": [{"t_s", "total", "per_process": {pid: MiB}, "load1", "others_cpu_s"}],
     "first_round_s", "warmup_s", "rss_baseline", "rss_growth_pct" (last sample vs the first one after
     warm-up: the first round and at least --warmup-s seconds, default 300), "rss_max_growth_pct",
     "rss_growth_since_first_round_pct", "server_alive", "server_log": {"errors", "tracebacks", "http_5xx", "http_2xx"},
     "rounds": [{"prompts", "completed", "failed", "duration_s", "output_tok_s", "p99_ttft_ms", ...}],
     "contention", "note"}

TTFT, TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end latency percentiles are over every
completed request of every round (from ``--save-detailed``), not averages of round percentiles.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "from vllm_qexpand.serve import vllm_cli; vllm_cli()"


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}  # fmt: skip


class Sampler(threading.Thread):
    """Every `every` seconds: RSS of the server's process tree, load average, CPU used by other processes."""

    def __init__(self, server_pid: int, every: float, t0: float):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.server = psutil.Process(server_pid)
        self.every, self.t0 = every, t0
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self._last = self._cpu()

    def _ours_cpu(self) -> float:
        """CPU seconds of this process, its live descendants and its waited-for children."""
        me = self.psutil.Process()
        total = sum(me.cpu_times()[:2])
        for p in me.children(recursive=True):
            try:
                total += sum(p.cpu_times()[:2])
            except self.psutil.Error:
                pass
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ru.ru_utime + ru.ru_stime

    def _cpu(self) -> tuple[float, float]:
        t = self.psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        return busy, self._ours_cpu()

    def sample(self) -> dict:
        per = {}
        for p in [self.server, *self.server.children(recursive=True)]:
            try:
                per[str(p.pid)] = round(p.memory_info().rss / 2**20, 1)
            except self.psutil.Error:
                pass
        busy, ours = self._cpu()
        others = max(0.0, (busy - self._last[0]) - (ours - self._last[1]))
        self._last = (busy, ours)
        s = {"t_s": round(time.monotonic() - self.t0, 1), "total": round(sum(per.values()), 1), "per_process": per,
             "load1": round(os.getloadavg()[0], 2), "others_cpu_s": round(others, 1)}  # fmt: skip
        self.samples.append(s)
        return s

    def run(self):
        while not self.stop.wait(self.every):
            try:
                s = self.sample()
                print(f"[soak] t={s['t_s']:.0f}s server RSS {s['total']:.0f} MiB, load {s['load1']}, "
                      f"other processes {s['others_cpu_s']:.0f} CPU-s", flush=True)  # fmt: skip
            except self.psutil.Error as e:
                print(f"[soak] sample failed: {e}", flush=True)


def prepare_model(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    src = Path(args.model)
    if not (src / "config.json").exists():
        if src.resolve() != (ROOT / "models" / "smollm2-135m").resolve():
            sys.exit(f"{src}: no config.json")
        subprocess.run([sys.executable, "-m", "vllm_qexpand.cli", "fetch", "smollm2-135m", str(src)], check=True,
                       env=_env())  # fmt: skip
    tag = "-".join(a.strip("-").replace("=", "") for a in shlex.split(args.convert_args)) or "default"
    dst = Path(args.work) / f"soak-{src.name}-{tag}"
    if not (dst / "config.json").exists():
        subprocess.run([sys.executable, "-m", "vllm_qexpand.cli", "convert", str(src), str(dst),
                        *shlex.split(args.convert_args), "--quiet"], check=True, env=_env())  # fmt: skip
    return dst


def launch_server(model: Path, server_args: list[str], log: Path, env: dict, timeout_s: float = 900):
    """`python -m vllm_qexpand.serve MODEL ARGS` (its own session, output to `log`) -> (proc, log file, base URL)
    once /health answers; exits naming the log if it dies or is not healthy within `timeout_s`. `server_args`
    must hold --host 127.0.0.1 and --port."""
    port = server_args[server_args.index("--port") + 1]
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_qexpand.serve", str(model), *server_args], stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, fh, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(f"server not healthy after {timeout_s:.0f} s; see {log}")
        time.sleep(2)


def start_server(dst: Path, args, log: Path):
    server_args = ["--host", "127.0.0.1", "--port", str(free_port()), "--dtype", "float32",
                   "--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.max_model_len),
                   "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)), "--seed", "0",
                   *shlex.split(args.server_args)]  # fmt: skip
    proc, fh, base = launch_server(dst, server_args, log, _env())
    return proc, base, server_args, fh


def stop_server(proc, fh):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its children only
            proc.wait()
    fh.close()


def client_args(args, dst: Path, base: str) -> list[str]:
    return ["--backend", "vllm", "--base-url", base, "--endpoint", "/v1/completions", "--model", str(dst),
            "--tokenizer", str(dst), "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", str(args.range_ratio),
            "--ignore-eos", "--request-rate", "inf", "--max-concurrency", str(args.concurrency),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--num-warmups", "0", "--disable-tqdm", "--save-result", "--save-detailed"]  # fmt: skip


def run_round(i: int, n: int, common: list[str], tmp: Path, timeout: float) -> dict:
    name = f"round-{i}.json"
    cmd = [sys.executable, "-c", CLI, "bench", "serve", *common, "--num-prompts", str(n), "--seed", str(1000 + i),
           "--result-dir", str(tmp), "--result-filename", name]  # fmt: skip
    t = time.monotonic()
    log = tmp / f"round-{i}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    wall = time.monotonic() - t
    path = tmp / name
    if rc != 0 or not path.exists():
        tail = log.read_text()[-3000:]
        return {"round": i, "prompts": n, "rc": rc, "wall_s": wall, "result": None, "log_tail": tail}
    return {"round": i, "prompts": n, "rc": rc, "wall_s": wall, "result": json.loads(path.read_text())}


def server_log_summary(log: Path) -> dict:
    import re

    text = log.read_text(errors="replace").splitlines()
    codes = collections.Counter()
    for ln in text:
        m = re.search(r'"(?:GET|POST) \S+ HTTP/1\.1" (\d{3})', ln)
        if m:
            codes[m.group(1)[0] + "xx"] += 1
    return {"errors": sum(1 for ln in text if re.search(r"\bERROR\b", ln)),
            "tracebacks": sum(1 for ln in text if "Traceback" in ln),
            "http_2xx": codes["2xx"], "http_4xx": codes["4xx"], "http_5xx": codes["5xx"]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    ap.add_argument("--convert-args", default="--scheme w4a4 --expand down_proj=1")
    ap.add_argument("--checkpoint", default=None, help="an already converted qexpand directory (skips fetch/convert)")
    ap.add_argument("--work", default=str(ROOT / "models"))
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load (no round starts after it)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.5, help="random lengths in [len·(1-r), len·(1+r)]")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--server-args", default="", help="more `vllm serve` arguments")
    ap.add_argument("--round-s", type=float, default=180.0, help="target length of one client round")
    ap.add_argument("--first-round", type=int, default=128, help="prompts in the first round (the warm-up)")
    ap.add_argument("--sample-s", type=float, default=60.0)
    ap.add_argument("--warmup-s", type=float, default=300.0,
                    help="RSS growth is measured from the first sample after the first round and this many seconds")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, metavar="RAW", help="only write --out again from a soak-raw.json")
    args = ap.parse_args()
    if args.summarize:
        raw = json.loads(Path(args.summarize).read_text())
        return summarize(raw, Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"soak-{raw['date']}.json")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import device_string, versions

    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"soak-{date}.json"
    dst = prepare_model(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    server_log = work / "soak-server.log"
    print(f"[soak] serving {dst}", flush=True)
    proc, base, server_args, fh = start_server(dst, args, server_log)
    common = client_args(args, dst, base)
    rounds, results = [], []
    t0 = time.monotonic()
    sampler = Sampler(proc.pid, args.sample_s, t0)
    first = sampler.sample()
    print(f"[soak] server up, RSS {first['total']:.0f} MiB; load for {args.duration:.0f} s", flush=True)
    sampler.start()
    warmup_s = None
    try:
        tmp = work / "soak-rounds"  # every round's `vllm bench serve` result and log stay here
        tmp.mkdir(parents=True, exist_ok=True)
        for old in tmp.glob("round-*"):
            old.unlink()
        if True:
            n, i = args.first_round, 0
            while True:
                elapsed = time.monotonic() - t0
                if elapsed >= args.duration or proc.poll() is not None:
                    break
                timeout = max(600.0, 4 * args.round_s)
                r = run_round(i, n, common, tmp, timeout)
                rounds.append(r)
                res = r["result"]
                if res is None:
                    print(f"[soak] round {i}: client failed (rc {r['rc']}):\n{r['log_tail']}", flush=True)
                    break
                results.append(res)
                rate = res["completed"] / max(res["duration"], 1e-6)
                print(f"[soak] round {i}: {n} prompts, {res['completed']} completed, {res['failed']} failed, "
                      f"{res['duration']:.0f} s, {res['output_throughput']:.1f} output tok/s", flush=True)  # fmt: skip
                if warmup_s is None:
                    warmup_s = time.monotonic() - t0
                    try:
                        sampler.sample()["after_warmup"] = True
                    except Exception as e:  # noqa: BLE001  (the server died: the loop ends below)
                        print(f"[soak] sample failed: {e}", flush=True)
                i += 1
                left = args.duration - (time.monotonic() - t0)
                if left <= 0:
                    break
                # next round: about --round-s seconds, or what is left; whole multiples of the concurrency
                target = min(args.round_s, left)
                n = max(args.concurrency, int(rate * target) // args.concurrency * args.concurrency)
    finally:
        sampler.stop.set()
        sampler.join(timeout=30)
        try:
            sampler.sample()["final"] = True
        except Exception:  # noqa: BLE001
            pass
        alive = proc.poll() is None
        duration = time.monotonic() - t0
        stop_server(proc, fh)

    vllm_v, torch_v = versions()
    raw = {"date": date, "device": device_string(), "vllm": vllm_v, "torch": torch_v, "args": vars(args),
           "checkpoint": str(dst), "server_args": server_args, "client_args": common, "rounds": rounds,
           "samples": sampler.samples, "warmup_s": warmup_s, "duration": duration, "alive": alive,
           "server_log": str(server_log), "cores": os.cpu_count()}  # fmt: skip
    (work / "soak-raw.json").write_text(json.dumps(raw) + "\n")  # everything, to summarize again if needed
    return summarize(raw, out)


def summarize(raw: dict, out: Path) -> int:
    args = argparse.Namespace(**raw["args"])
    rounds, samples, duration, alive = raw["rounds"], raw["samples"], raw["duration"], raw["alive"]
    warmup_s, dst, server_args, common = raw["warmup_s"], raw["checkpoint"], raw["server_args"], raw["client_args"]
    server_log = Path(raw["server_log"])
    results = [r["result"] for r in rounds if r["result"] is not None]
    ttft, tpot, e2el, errors = [], [], [], collections.Counter()
    sent = completed = failed = out_tokens = 0
    for res in results:
        sent += len(res.get("errors") or []) or (res["completed"] + res["failed"])
        completed += res["completed"]
        failed += res["failed"]
        out_tokens += res["total_output_tokens"]
        for t, lat, n_out, err in zip(res["ttfts"], res["latencies"], res["output_lens"], res["errors"]):
            if err:
                errors[str(err)[:300]] += 1
                continue
            ttft.append(1000 * t)
            e2el.append(1000 * lat)
            if n_out > 1:
                tpot.append(1000 * (lat - t) / (n_out - 1))
    for r in rounds:
        if r["result"] is None:
            sent += r["prompts"]
            failed += r["prompts"]
            errors[f"client round {r['round']} failed: rc {r['rc']}"] += r["prompts"]
    load_s = sum(res["duration"] for res in results)
    # warm-up: the first round and at least --warmup-s seconds; growth from the first sample after it
    first_round = next((s for s in samples if s.get("after_warmup")), samples[0] if samples else None)
    args.warmup_s = getattr(args, "warmup_s", 300.0)
    warm_t = max(first_round["t_s"] if first_round else 0.0, args.warmup_s)
    base_sample = next((s for s in samples if s["t_s"] >= warm_t and not s.get("final")), None) or first_round
    after = [s for s in samples if base_sample and s["t_s"] >= base_sample["t_s"]]
    growth = max_growth = growth_first = None
    if base_sample and after:
        growth = 100 * (after[-1]["total"] - base_sample["total"]) / base_sample["total"]
        max_growth = 100 * (max(s["total"] for s in after) - base_sample["total"]) / base_sample["total"]
    if first_round and samples:
        growth_first = 100 * (samples[-1]["total"] - first_round["total"]) / first_round["total"]
    others = sum(s.get("others_cpu_s", 0) for s in samples)
    result = {
        "date": raw["date"], "device": raw["device"], "vllm": raw["vllm"], "torch": raw["torch"],
        "model": str(Path(args.model).name), "checkpoint": str(dst), "convert_args": args.convert_args,
        "server_args": server_args, "client": "vllm bench serve", "client_args": common,
        "duration_s": round(duration, 1), "target_duration_s": args.duration, "load_s": round(load_s, 1),
        "concurrency": args.concurrency, "input_len": args.input_len, "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "sent": sent, "completed": completed, "failed": failed, "errors": dict(errors),
        "output_tokens": out_tokens, "output_tok_s": round(out_tokens / load_s, 2) if load_s else None,
        "request_s": round(completed / load_s, 3) if load_s else None,
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "e2el_ms": percentiles(e2el),
        "first_round_s": round(warmup_s, 1) if warmup_s else None, "warmup_s": args.warmup_s,
        "rss_baseline": {"t_s": base_sample["t_s"], "total": base_sample["total"]} if base_sample else None,
        "rss_growth_pct": round(growth, 2) if growth is not None else None,
        "rss_growth_since_first_round_pct": round(growth_first, 2) if growth_first is not None else None,
        "rss_max_growth_pct": round(max_growth, 2) if max_growth is not None else None,
        "rss_mib": samples, "server_alive": alive, "server_log": server_log_summary(server_log),
        "rounds": [{"round": r["round"], "prompts": r["prompts"], "rc": r["rc"], "wall_s": round(r["wall_s"], 1),
                    **({k: r["result"][k] for k in ("completed", "failed", "duration", "output_throughput",
                                                     "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms")
                        if k in r["result"]} if r["result"] else {})} for r in rounds],
        "contention": {"others_cpu_s": round(others, 1), "cores": raw["cores"],
                       "others_cpu_share": round(others / (duration * (raw["cores"] or 1)), 3) if duration else None,
                       "load1": [s["load1"] for s in samples]},
        "note": args.note,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[soak] {duration:.0f} s: sent {sent}, completed {completed}, failed {failed}, "
          f"{result['output_tok_s']} output tok/s, TTFT p50/p99 {result['ttft_ms'].get('p50', 0):.0f}/"
          f"{result['ttft_ms'].get('p99', 0):.0f} ms, TPOT p50/p99 {result['tpot_ms'].get('p50', 0):.0f}/"
          f"{result['tpot_ms'].get('p99', 0):.0f} ms, RSS growth {result['rss_growth_pct']}% -> {out}", flush=True)
    return 0 if failed == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
