import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
# the CPU GEMM crossover depends on the CPU (1 token with VNNI, else 64): tests pin 64 so both CPU GEMMs
# (int8 for prefill-sized steps, float32 codes for decode) run on every machine
os.environ.setdefault("VLLM_QEXPAND_INT8_MIN_TOKENS", "64")
# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any module (ours or
# vLLM's) imports Triton, so the kernel tests run in the interpreter on machines without CUDA
if not os.path.exists("/dev/nvidia0") and not os.environ.get("QEXPAND_TEST_COMPILED"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# A tiny Llama vLLM's CPU attention accepts (head_dim 32; it needs >= 32), shared by tests/test_plugin_*.py
SERVE_SHAPE = dict(hidden=128, intermediate=320, heads=4, kv_heads=2, layers=2)


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory):
    """`get(name, **Options)`: the tiny source (name 'src') or a cached qexpand conversion of it."""
    from tiny import make_tiny_llama
    from vllm_qexpand.converters.pipeline import Options, convert

    root = tmp_path_factory.mktemp("serve-models")
    cache = {"src": make_tiny_llama(root / "src", **SERVE_SHAPE)}

    def get(name: str, **options):
        if name not in cache:
            convert(cache["src"], root / name, Options(progress=False, **options))
            cache[name] = root / name
        return cache[name]

    return get


@pytest.fixture(scope="session")
def benchmark():
    """`benchmark(name)`: benchmarks/<name>.py loaded as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"qexpand_bench_{name}", os.path.join(root, "benchmarks", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="module")
def load_vllm():
    """`load(config_dir, weights_dir=None, dtype="float32")` -> the vLLM model built in this process (vLLM's
    model loader, TP=1, no engine; weights from weights_dir if given). Shared by tests/test_plugin_*.py."""
    import torch
    from server import free_port

    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    saved = (torch.accelerator.synchronize, torch.accelerator.empty_cache)
    _set_torch_accelerator_to_noop()  # what vLLM's CPU worker does
    state = {"init": False}

    def load(config_dir, weights_dir=None, dtype="float32"):
        vc = EngineArgs(
            model=str(config_dir), dtype=dtype, enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=16 << 20
        ).create_engine_config()
        if weights_dir is not None:
            vc.model_config.model = str(weights_dir)
        with set_current_vllm_config(vc):
            if not state["init"] and not model_parallel_is_initialized():
                port = free_port()
                init_distributed_environment(
                    world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
                )
                initialize_model_parallel(1, 1)
                state["init"] = True
            return get_model_loader(vc.load_config).load_model(vllm_config=vc, model_config=vc.model_config)

    yield load
    if state["init"]:
        destroy_model_parallel()
        destroy_distributed_environment()
    torch.accelerator.synchronize, torch.accelerator.empty_cache = saved


@pytest.fixture(scope="session")
def break_checkpoint():
    """`make(good_dir, dst_dir, kind)`: a copy of a qexpand dir with one defect (returns (dst, culprit))."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def make(good, dst, kind):
        shutil.copytree(good, dst)
        wmap = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
        name = {
            "truncated": "model.layers.1.mlp.down_proj.weight_packed",
            "scale_shape": "model.layers.0.mlp.gate_proj.weight_scale",
            "missing": "model.layers.1.self_attn.k_proj.weight_scale",
            "packed_dtype": "model.layers.0.self_attn.o_proj.weight_packed",
        }[kind]
        shard = dst / wmap[name]
        if kind == "truncated":
            data = shard.read_bytes()
            shard.write_bytes(data[: len(data) - 100])
            return dst, shard.name
        tensors = load_file(shard)
        if kind == "scale_shape":
            tensors[name] = tensors[name].repeat(1, 2)
        elif kind == "missing":
            del tensors[name]
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            del index["weight_map"][name]
            (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        elif kind == "packed_dtype":
            tensors[name] = tensors[name].float()
        save_file(tensors, shard, metadata={"format": "pt"})
        return dst, name

    return make
