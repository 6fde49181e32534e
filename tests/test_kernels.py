"""Triton kernels vs their torch references, run by Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel modules are
first imported, so it is set here before any import of them; it must also stay set while
interpreted kernels run (Triton checks it again at launch), so it is not restored. GPU tests
(compiled kernels) run only on a CUDA machine with the interpreter off:

    QEXPAND_TEST_COMPILED=1 pytest -m gpu tests/test_kernels.py
"""
import os

if os.environ.get("QEXPAND_TEST_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_qexpand import quant  # noqa: E402
from vllm_qexpand.kernels import HAS_TRITON, interpreting  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU tests need TRITON_INTERPRET=1")
compiled_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(), reason="needs CUDA and compiled Triton (QEXPAND_TEST_COMPILED=1)"
)

if HAS_TRITON:
    from vllm_qexpand.kernels import hadamard_quant as hq
    from vllm_qexpand.kernels import ops
    from vllm_qexpand.kernels import w4a8_gemm as gm


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _act(t, n, seed, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(t, n, generator=g) * (torch.rand(t, 1, generator=g) * 4 + 0.1)
    return x.to(dtype)


def _unpacked(codes, bits):
    return hq.unpack_activation_int4(codes) if bits == 4 else codes


def _check_codes(got, ref, bits):
    """>= 99.9% of codes equal, the rest off by one (float summation order at .5 ties)."""
    d = (_unpacked(got, bits).int() - _unpacked(ref, bits).int()).abs()
    assert d.max().item() <= 1
    assert (d == 0).float().mean().item() >= 0.999
    return int((d != 0).sum())


def _poisoned_act_outputs(t, size, bits):
    codes_shape, scale_shape, sums_shape = hq.output_shapes(t, size, bits)
    codes = torch.full(codes_shape, 0x5A, dtype=torch.int8 if bits == 8 else torch.uint8)
    return codes, torch.full(scale_shape, float("nan")), torch.full(sums_shape, -(2**31), dtype=torch.int32)


# ----------------------------------------------------------------------------- interpreter


@needs_interpreter
def test_interpreter_really_runs():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(hq._hadamard_quant_kernel, InterpretedFunction), "kernels imported before TRITON_INTERPRET=1"
    assert isinstance(gm._w4_gemm_kernel, InterpretedFunction)
    codes, scale, sums = hq.hadamard_quant(torch.ones(1, 64), 64, 0, 1, 8)  # CPU tensors: only the interpreter runs these
    assert codes.eq(127).all() and scale.item() == pytest.approx(1 / 127) and sums.item() == 127 * 64


# ----------------------------------------------------------------------------- hadamard_quant

# (T, N, M, k, blocks, bits, dtype, tokens per program)
HQ_CASES = [
    (3, 64, 64, 1, 1, 8, torch.float32, None),
    (17, 576, 576, 36, 1, 8, torch.float32, 4),
    (1, 1536, 1536, 12, 1, 4, torch.float32, None),
    (17, 1536, 1664, 52, 1, 8, torch.float32, 2),
    (3, 1536, 1664, 52, 1, 4, torch.bfloat16, None),
    (3, 2240, 2240, 140, 1, 4, torch.float32, None),
    (3, 1024, 1152, 36, 2, 8, torch.float32, None),
    (3, 80, 96, 0, 1, 4, torch.float32, None),
]


@needs_interpreter
@pytest.mark.parametrize("t,n,m,k,blocks,bits,dtype,tokens", HQ_CASES)
def test_hadamard_quant_matches_reference(t, n, m, k, blocks, bits, dtype, tokens):
    x = _act(t, n, seed=m + t + bits, dtype=dtype)
    if t > 1:
        x[1] = 0  # an all-zero token: scale 1, codes 0
    out = _poisoned_act_outputs(t, m, bits)
    codes, scale, sums = hq.hadamard_quant(x, m, k, blocks, bits, tokens_per_program=tokens, out=out)
    assert all(a is b for a, b in zip((codes, scale, sums), out))
    ref_codes, ref_scale, ref_sums = hq.hadamard_quant_reference(x, m, k, blocks, bits)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
    mismatches = _check_codes(codes, ref_codes, bits)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert torch.equal(sums, _unpacked(codes, bits).int().sum(1, dtype=torch.int32))
    assert (sums - ref_sums).abs().sum().item() <= mismatches


@needs_interpreter
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_rounds_half_to_even(bits):
    qm = 2 ** (bits - 1) - 1
    x = torch.zeros(2, 16)
    x[0, :8] = torch.tensor([qm, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -qm])  # scale 1: exact ties
    x[1, :3] = torch.tensor([-qm, 4.5, -1.5])
    codes, _, sums = hq.hadamard_quant(x, 16, 0, 1, bits)
    ref, _, ref_sums = hq.hadamard_quant_reference(x, 16, 0, 1, bits)
    assert torch.equal(codes, ref) and torch.equal(sums, ref_sums)
    assert _unpacked(codes, bits)[0, :8].tolist() == [qm, 0, 2, 2, -2, 0, 4, -qm]


@needs_interpreter
@pytest.mark.parametrize("t,n,m,k", [(3, 1536, 1536, 12), (5, 512, 576, 36), (2, 200, 256, 0)])
def test_hadamard_quant_plane_order(t, n, m, k):
    """bits 8 with planes=True: the same codes, per 64 inputs the 32 even ones then the 32 odd ones
    (32-bit stores where a tile row holds whole 64-blocks: 1536; byte stores otherwise: 576)."""
    x = _act(t, n, seed=m + 1)
    codes, scale, sums = hq.hadamard_quant(x, m, k, 1, 8, planes=True)
    plain = hq.hadamard_quant(x, m, k, 1, 8)
    assert torch.equal(codes, hq.to_planes(plain[0])) and torch.equal(hq.from_planes(codes), plain[0])
    assert torch.equal(scale, plain[1]) and torch.equal(sums, plain[2])
    assert codes[0, 32].item() == plain[0][0, 1].item() and codes[0, 1].item() == plain[0][0, 2].item()
    with pytest.raises(ValueError, match="plane order"):
        hq.hadamard_quant(x, m, k, 1, 4, planes=True)


def test_plan_covers_the_block():
    for size, k, blocks in [(64, 1, 1), (576, 36, 1), (1664, 52, 1), (2240, 140, 1), (1152, 36, 2), (14336, 28, 1), (17920, 140, 1)]:
        p = hq.plan(size, k, blocks)
        assert p.r * p.p2 == size // blocks and p.rows >= blocks * p.rb >= blocks * p.r and p.pb >= p.p2
        hrow, hcol = hq.hadamard_operands(size, k, blocks)
        assert hrow.shape == (p.rows, p.rows) and hcol.shape == (p.pb, p.pb)
    with pytest.raises(ValueError):
        hq.plan(1000, 12, 1)


# ----------------------------------------------------------------------------- GEMM


def test_repack_layout_and_sums():
    q = torch.randint(-8, 8, (5, 48), generator=_gen(1), dtype=torch.int8)
    packed = quant.pack_int4(q)
    w = gm.repack_for_kernel(packed)
    u = (q.int() + 8).reshape(5, 24, 2)
    assert w.dtype == torch.uint8 and torch.equal(w.int(), u[..., 0] | (u[..., 1] << 4))
    assert torch.equal(gm.weight_code_sums(packed), q.int().sum(1, dtype=torch.int32))
    # the activation packing of hadamard_quant (bits 4) is the same nibble layout
    assert torch.equal(hq.unpack_activation_int4(w), q)


def _gemm_inputs(t, n, k, bits, group_size, seed):
    g = _gen(seed)
    wq = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    wscale = torch.rand(n, k // group_size if group_size else 1, generator=g) * 0.01 + 1e-3
    lim = 8 if bits == 4 else 128
    a = torch.randint(-lim, lim, (t, k), generator=g, dtype=torch.int8)
    if bits == 8:
        a[0, :4] = torch.tensor([-128, 127, -128, 127], dtype=torch.int8)  # range ends
    ascale = torch.rand(t, 1, generator=g) + 0.1
    return a, ascale, a.int().sum(1, dtype=torch.int32), quant.pack_int4(wq), wscale, torch.randn(n, generator=g)


# (T, N, K, act bits, group size, config, out dtype, bias)
GEMM_CASES = [
    (1, 32, 64, 8, 0, dict(BM=16, BN=32, BK=32, split_k=1), torch.float32, False),
    (17, 48, 576, 8, 0, dict(BM=16, BN=32, BK=64, split_k=1), torch.bfloat16, True),
    (3, 32, 1664, 8, 0, dict(BM=16, BN=32, BK=64, split_k=3), torch.float16, False),
    (17, 40, 2240, 4, 0, dict(BM=16, BN=32, BK=64, split_k=1), torch.float32, True),
    (1, 32, 1536, 4, 0, dict(BM=16, BN=32, BK=64, split_k=4), torch.bfloat16, True),
    (3, 32, 256, 8, 64, dict(BM=16, BN=32, BK=32, split_k=1), torch.float32, False),
    (3, 32, 192, 4, 64, dict(BM=16, BN=32, BK=64, split_k=1), torch.float32, True),
    (3, 32, 256, 4, 128, dict(BM=16, BN=32, BK=64, split_k=1), torch.float32, False),  # 2 K tiles per group
    # K % BK != 0: the masked K tail (0 bytes), with N and T not multiples of the tile (clamped rows)
    (5, 40, 208, 4, 0, dict(BM=16, BN=32, BK=64, split_k=2), torch.float32, True),
    (5, 40, 208, 8, 0, dict(BM=16, BN=32, BK=64, split_k=1), torch.float32, False),
]


@needs_interpreter
@pytest.mark.parametrize("t,n,k,bits,group,config,dtype,with_bias", GEMM_CASES)
def test_w4_gemm_matches_reference(t, n, k, bits, group, config, dtype, with_bias):
    a, ascale, asum, wpacked, wscale, bias = _gemm_inputs(t, n, k, bits, group, seed=t * k + n)
    bias = bias if with_bias else None
    w = gm.repack_for_kernel(wpacked)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    assert config.get("fast", gm._fast_default(a.device)) is False
    if bits == 8:
        y = gm.w4a8_gemm(a, ascale, asum, w, wscale, group, dtype, bias, config=config, out=out)
    else:
        ap = quant.pack_int4(a).view(torch.uint8)
        y = gm.w4a4_gemm(ap, ascale, asum, w, gm.weight_code_sums(wpacked), wscale, group, dtype, bias, config=config, out=out)
    assert y is out and not y.isnan().any()
    ref = gm.w4_gemm_reference(a, ascale, wpacked, wscale, group, torch.float64, bias)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@needs_interpreter
@pytest.mark.parametrize(
    "t,n,k,group,config",
    [
        (5, 40, 576, 0, dict(BM=16, BN=32, BK=128, split_k=2)),  # K % BK != 0: masked planes
        (3, 32, 256, 64, dict(BM=16, BN=32, BK=64, split_k=1)),  # grouped scales
        (17, 48, 512, 0, dict(BM=64, BN=64, BK=64, split_k=1)),
    ],
)
def test_w4a8_gemm_plane_ordered_activations(t, n, k, group, config):
    """W4A8 with a_planes=True takes to_planes(codes) and returns exactly the natural-order result."""
    a, ascale, asum, wpacked, wscale, bias = _gemm_inputs(t, n, k, 8, group, seed=t + k)
    w = gm.repack_for_kernel(wpacked)
    y = gm.w4a8_gemm(hq.to_planes(a), ascale, asum, w, wscale, group, torch.float32, bias, config=config, a_planes=True)
    y_nat = gm.w4a8_gemm(a, ascale, asum, w, wscale, group, torch.float32, bias, config=config)
    assert torch.equal(y, y_nat)
    ref = gm.w4_gemm_reference(a, ascale, wpacked, wscale, group, torch.float64, bias)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(ValueError, match="plane-ordered"):
        gm.w4a8_gemm(a[:, :k - 64 + 32], ascale, asum, w[:, :(k - 32) // 2], wscale[:, :1], 0, a_planes=True)


@needs_interpreter
def test_default_config_split_k_path():
    # the op path (default config): M = 3 on "8 SMs" picks split-K
    a, ascale, asum, wpacked, wscale, _ = _gemm_inputs(3, 24, 1024, 8, 0, seed=5)
    assert gm.default_config(3, 24, 1024, a.device)["split_k"] > 1
    y = gm.w4a8_gemm(a, ascale, asum, gm.repack_for_kernel(wpacked), wscale, 0, torch.float32)
    ref = gm.w4_gemm_reference(a, ascale, wpacked, wscale, 0, torch.float64)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# ----------------------------------------------------------------------------- ops / linear


@needs_interpreter
@pytest.mark.parametrize("bits", [8, 4])
def test_ops_opcheck(bits):
    x = _act(3, 48, seed=3)
    hrow, hcol = hq.hadamard_operands(64, 1, 1)
    torch.library.opcheck(torch.ops.qexpand.hadamard_quant.default, (x, hrow, hcol, 64, 1, 1, bits))
    codes, scale, sums = torch.ops.qexpand.hadamard_quant(x, hrow, hcol, 64, 1, 1, bits)
    _, _, _, wpacked, wscale, bias = _gemm_inputs(3, 16, 64, bits, 0, seed=4)
    w = gm.repack_for_kernel(wpacked)
    amax = torch.ops.qexpand.hadamard_absmax(x, hrow, hcol, 64, 1, 1)
    torch.library.opcheck(torch.ops.qexpand.hadamard_absmax.default, (x, hrow, hcol, 64, 1, 1))
    torch.library.opcheck(torch.ops.qexpand.hadamard_quant_amax.default, (x, hrow, hcol, amax * 2, 64, 1, 1, bits, bits == 8))
    if bits == 8:
        args = (codes, scale, sums, w, wscale, 0, torch.bfloat16, bias)
        torch.library.opcheck(torch.ops.qexpand.w4a8_gemm.default, args)
        planes = torch.ops.qexpand.hadamard_quant(x, hrow, hcol, 64, 1, 1, bits, True)[0]
        torch.library.opcheck(torch.ops.qexpand.w4a8_gemm.default, (planes, scale, sums, w, wscale, 0, torch.bfloat16, bias, True))
    else:
        args = (codes, scale, sums, w, gm.weight_code_sums(wpacked), wscale, 0, torch.float32, None)
        torch.library.opcheck(torch.ops.qexpand.w4a4_gemm.default, args)


@needs_interpreter
@pytest.mark.parametrize(
    "bits,n,rotation,dtype",
    [
        (8, 1536, (1664, 52, 1), torch.float32),
        (4, 1536, (1664, 52, 1), torch.bfloat16),
        (4, 1024, (1152, 36, 2), torch.float32),
        (8, 192, None, torch.float32),
    ],
)
def test_linear_matches_qlinear(bits, n, rotation, dtype):
    m = rotation[0] if rotation else n
    g = _gen(m + bits)
    wq = torch.randint(-8, 8, (24, m), generator=g, dtype=torch.int8)
    wscale = torch.rand(24, 1, generator=g) * 0.01 + 1e-3
    bias = torch.randn(24, generator=g).to(dtype)
    x = _act(5, n, seed=m, dtype=dtype).reshape(1, 5, n)
    prepared = ops.prepare_weights(quant.pack_int4(wq), wscale, rotation=rotation, act_dtype=dtype)
    y = ops.qexpand_linear_gpu(x, **prepared, act_bits=bits, rotation=rotation, bias=bias)
    assert y.shape == (1, 5, 24) and y.dtype == dtype
    ref = quant.qlinear(x, quant.dequantize_weight(wq, wscale), act_bits=bits, rotation=rotation) + bias.float()
    tol = 1e-4 if dtype == torch.float32 else 8e-3
    assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    # the checkpoint layout as is: derived tensors computed on every call (correct, slower)
    y2 = ops.qexpand_linear_gpu(x, quant.pack_int4(wq), wscale, act_bits=bits, rotation=rotation, bias=bias, hk=None)
    assert torch.equal(y, y2)


@needs_interpreter
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_tp2_ranks_sum_to_tp1(bits):
    """A row-parallel layer at TP=2 (--tp-blocks 2): each rank rotates its block, quantizes with the whole
    token's max (amax_reduce) and runs its GEMM shard; the two partial outputs sum to the TP=1 linear."""
    n, rotation = 1024, (1152, 36, 2)  # 2 blocks of 512 -> 576 = 36·16
    g = _gen(bits)
    wq = torch.randint(-8, 8, (24, 1152), generator=g, dtype=torch.int8)
    wscale = torch.rand(24, 1, generator=g) * 0.01 + 1e-3
    x = _act(5, n, seed=bits)
    x[:, 600] *= 30  # an outlier in rank 1's block: rank 0's own max would be far smaller
    ref = quant.qlinear(x, quant.dequantize_weight(wq, wscale), act_bits=bits, rotation=rotation)
    token_max = quant.online_rotate(x, *rotation[:2], None, rotation[2]).abs().amax(-1, keepdim=True)
    seen = []

    def amax_reduce(local):  # what the all-gather + max across the two ranks returns
        seen.append(local)
        return torch.maximum(local, token_max)

    parts, alone = [], []
    for r in range(2):
        xr, wr = x[:, 512 * r:512 * (r + 1)], quant.pack_int4(wq[:, 576 * r:576 * (r + 1)].contiguous())
        prepared = ops.prepare_weights(wr, wscale, rotation=(576, 36, 1), act_dtype=torch.float32)
        parts.append(ops.qexpand_linear_gpu(xr, **prepared, act_bits=bits, rotation=(576, 36, 1), amax_reduce=amax_reduce))
        alone.append(ops.qexpand_linear_gpu(xr, **prepared, act_bits=bits, rotation=(576, 36, 1)))
    assert len(seen) == 2 and torch.allclose(torch.maximum(*seen), token_max)  # each rank passed its own slice's max
    assert (seen[0] < token_max).any()
    y = parts[0] + parts[1]
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert (alone[0] + alone[1] - ref).abs().max().item() > 1e-3 * ref.abs().max().item()  # per-rank scales differ


@needs_interpreter
@pytest.mark.parametrize("n,rotation,group", [(1536, (1664, 52, 1), 0), (200, None, 0), (1024, (1152, 36, 2), 64)])
def test_w4a4_int8_codes_path_is_bit_identical(monkeypatch, n, rotation, group):
    """VLLM_QEXPAND_W4A4_CODES=int8: the 4-bit codes stored one per int8 (plane order where M % 64
    == 0) through the W4A8 GEMM give exactly the packed-int4 W4A4 path's output."""
    m = rotation[0] if rotation else n
    g = _gen(m)
    wq = torch.randint(-8, 8, (24, m), generator=g, dtype=torch.int8)
    wscale = torch.rand(24, m // group if group else 1, generator=g) * 0.01 + 1e-3
    x = _act(5, n, seed=m)
    prepared = ops.prepare_weights(quant.pack_int4(wq), wscale, rotation=rotation, act_dtype=torch.float32)
    y4 = ops.qexpand_linear_gpu(x, **prepared, act_bits=4, group_size=group, rotation=rotation)
    monkeypatch.setattr(ops, "W4A4_CODES", "int8")
    y8 = ops.qexpand_linear_gpu(x, **prepared, act_bits=4, group_size=group, rotation=rotation)
    assert torch.equal(y4, y8)
    codes = hq.hadamard_quant(x, m, rotation[1] if rotation else 0, rotation[2] if rotation else 1, 4, codes_int8=True)[0]
    packed = hq.hadamard_quant(x, m, rotation[1] if rotation else 0, rotation[2] if rotation else 1, 4)[0]
    assert codes.dtype == torch.int8 and torch.equal(codes, hq.unpack_activation_int4(packed))


@needs_interpreter
@pytest.mark.parametrize("bits", [4, 8])
def test_hadamard_quant_activation_clip(bits):
    """activations.clip < 1: the kernel's scale is (max · clip) / qmax and the tail saturates, as the reference."""
    x = _act(7, 1536, seed=5)
    x[:, 3] *= 30  # a tail for the clip to cut
    big = hq.hadamard_absmax(x, 1664, 52, 1) * 2
    for clip in (0.8, 0.55):
        for amax in (None, big):  # the token's own max, and a cross-rank max (the TP path)
            codes, scale, sums = hq.hadamard_quant(x, 1664, 52, 1, bits, amax=amax, clip=clip)
            ref_codes, ref_scale, _ = hq.hadamard_quant_reference(
                x, 1664, 52, 1, bits, amax_reduce=None if amax is None else (lambda a: big), clip=clip)
            torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
            _check_codes(codes, ref_codes, bits)
            got = _unpacked(codes, bits)
            assert torch.equal(sums, got.int().sum(1, dtype=torch.int32))
            if amax is None:
                qm = 2 ** (bits - 1) - 1
                assert int(got.max()) == qm and int(got.min()) >= -qm - 1  # saturated, never past the end codes
    own = hq.hadamard_quant(x, 1664, 52, 1, bits)
    assert not torch.equal(hq.hadamard_quant(x, 1664, 52, 1, bits, clip=0.8)[1], own[1])
    with pytest.raises(ValueError, match="clip"):
        hq.hadamard_quant(x, 1664, 52, 1, bits, clip=1.5)


@needs_interpreter
def test_tp_amax_two_pass_kernels_match_reference():
    """hadamard_absmax + hadamard_quant(amax=...) = the reference quantized with the reduced max."""
    x = _act(5, 512, seed=11)
    x[:, 7] *= 40
    for bits in (4, 8):
        local = hq.hadamard_absmax(x, 576, 36, 1)
        rot = quant.online_rotate(x, 576, 36, None, 1)
        torch.testing.assert_close(local, rot.abs().amax(-1, keepdim=True), rtol=1e-6, atol=0)
        big = local * torch.tensor([[1.0], [3.0], [1.5], [1.0], [7.0]])  # what another rank's larger max gives
        codes, scale, sums = hq.hadamard_quant(x, 576, 36, 1, bits, amax=big)
        ref_codes, ref_scale, _ = hq.hadamard_quant_reference(x, 576, 36, 1, bits, amax_reduce=lambda a: a * (big / local))
        torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
        _check_codes(codes, ref_codes, bits)
        assert torch.equal(sums, _unpacked(codes, bits).int().sum(1, dtype=torch.int32))
        own, _, _ = hq.hadamard_quant(x, 576, 36, 1, bits)
        assert not torch.equal(codes, own)  # the reduced max was used


def test_tp_fallback_stays_on_the_input_device():
    """The torch reference's rotation at TP > 1 (H_K included) runs on x's device.

    Every tensor that reaches a torch function must be on the input's device: with H_K built
    on the CPU (the old ``hadamard_transform``) a CUDA activation crashed on the first forward
    of a row-parallel layer; a meta activation makes the same mismatch visible here.
    """
    from torch.overrides import TorchFunctionMode

    mixed, calls = [], []

    class Devices(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            devices = {t.device.type for a in list(args) + list((kwargs or {}).values())
                       for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)}
            calls.append(func)
            if len(devices) > 1 and func is not torch.Tensor.to:  # an explicit transfer is fine
                mixed.append((getattr(func, "__name__", str(func)), devices))
            return func(*args, **(kwargs or {}))

    x = torch.empty(3, 14336, device="meta")
    with Devices():
        codes, scale, sums = hq.hadamard_quant_reference(x, 14336, 28, 1, 4, amax_reduce=lambda a: a * 2)
    assert len(calls) > 10 and not mixed, mixed
    assert codes.device.type == scale.device.type == sums.device.type == "meta"


@needs_interpreter
def test_token_result_does_not_depend_on_the_batch():
    """Issue 17: a token's codes, scale, code sum and GEMM output row are bit-identical alone and
    in batches of T = 1, 7, 40 under several tokens-per-program and GEMM tile configurations."""
    n, m, k, out = 448, 512, 1, 48
    rotation = (512, 1, 1)
    pool = _act(40, n, seed=21)
    g = _gen(22)
    wq = torch.randint(-8, 8, (out, m), generator=g, dtype=torch.int8)
    wscale = torch.rand(out, 1, generator=g) * 0.01 + 1e-3
    prepared = ops.prepare_weights(quant.pack_int4(wq), wscale, rotation=rotation, act_dtype=torch.float32)
    tok = pool[3:4]
    for bits in (4, 8):
        alone = hq.hadamard_quant(tok, m, k, 1, bits)
        for t, tokens in [(1, None), (7, 2), (40, None), (40, 3)]:
            batch = pool[:t].clone()
            batch[min(3, t - 1)] = tok[0]
            i = min(3, t - 1)
            got = hq.hadamard_quant(batch, m, k, 1, bits, tokens_per_program=tokens)
            for a, b in zip(alone, got):
                assert torch.equal(a[0], b[i])
        # the GEMM: integer-exact, then (acc · s_w) · s_x: the same row whatever the tile / split
        codes, scale, sums = alone
        ws = prepared["weight_sums"]
        ref = None
        others = hq.hadamard_quant(pool[:12], m, k, 1, bits)
        for cfg in [None, dict(BM=16, BN=32, BK=64, split_k=4), dict(BM=32, BN=16, BK=256, split_k=2)]:
            big_c, big_s, big_sum = (torch.cat([c.expand(*((40,) + c.shape[1:])), others[j]])
                                     for j, c in enumerate((codes, scale, sums)))
            if bits == 8:
                y1 = gm.w4a8_gemm(codes, scale, sums, prepared["weight"], wscale, 0, torch.float32, config=cfg)
                yb = gm.w4a8_gemm(big_c, big_s, big_sum, prepared["weight"], wscale, 0, torch.float32, config=cfg)
            else:
                y1 = gm.w4a4_gemm(codes, scale, sums, prepared["weight"], ws, wscale, 0, torch.float32, config=cfg)
                yb = gm.w4a4_gemm(big_c, big_s, big_sum, prepared["weight"], ws, wscale, 0, torch.float32, config=cfg)
            assert torch.equal(y1[0], yb[0]) and torch.equal(y1[0], yb[39])
            ref = y1 if ref is None else ref
            assert torch.equal(y1, ref)
        # and it is the integer-exact formulation: (float32(Σ codes) · s_w) · s_x
        acc = (_unpacked(codes, bits).double() @ wq.double().t()).float()
        assert torch.equal(ref, (acc * wscale.reshape(1, -1)) * scale)


def test_bf16_three_way_split_is_exact():
    """The compiled rotation's second product: u = hi + mid + lo in bf16 exactly, so three bf16
    MMAs against a ±1 matrix give the fp32 products exactly (the interpreter runs fp32 instead)."""
    u = torch.randn(4096, generator=_gen(5)) * torch.logspace(-20, 20, 4096)
    trunc = lambda z: (z.view(torch.int32) & -65536).view(torch.float32)  # noqa: E731 - the kernel's mask
    hi = trunc(u)
    rem = u - hi
    mid = trunc(rem)
    lo = (rem - mid).to(torch.bfloat16)
    for part in (hi, mid):
        assert torch.equal(part.to(torch.bfloat16).float(), part)  # already bf16 values
    assert torch.equal(hi.double() + mid.double() + lo.double(), u.double())


def test_linear_refuses_w4a16():
    with pytest.raises(NotImplementedError, match="Machete"):
        ops.qexpand_linear_gpu(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), act_bits=None)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from vllm_qexpand.kernels import HAS_TRITON, ops, hadamard_quant as hq, w4a8_gemm as gm\n"
        "assert not HAS_TRITON and not ops.OPS_REGISTERED\n"
        "c, s, n = hq.hadamard_quant_reference(torch.randn(2, 64), 64, 1)\n"
        "assert c.shape == (2, 64)\n"
        "try:\n    hq.hadamard_quant(torch.randn(2, 64), 64, 1)\nexcept RuntimeError as e:\n    print('refused', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused" in res.stdout


def test_static_report_compiles_like_the_jit(tmp_path):
    """The static SASS report (quick subset) without a GPU: the dispatch's own launches compiled for
    sm_90a with the JIT's specialization, the issue-13 schema, and targets judged from the counts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "vllm_qexpand.kernels.aot", "--quick", "--report", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert doc["target"] == "sm_90a" and doc["triton"] and doc["date"]
    gemm = [r for r in doc["rows"] if r["kernel"] == "w4a4_gemm"]
    had = [r for r in doc["rows"] if r["kernel"] == "hadamard_quant"]
    assert gemm and had
    for r in doc["rows"]:
        assert {"kernel", "shape", "M", "N", "K", "config", "regs", "spill_bytes", "wgmma", "predicted_ratio",
                "baseline"} <= set(r)
        assert r["regs"] > 0 and r["spill_bytes"] >= 0 and r["predicted_ratio"] > 0 and r["prediction"]
    large = next(r for r in gemm if r["M"] == 4096)
    decode = next(r for r in gemm if r["M"] == 1)
    # with the JIT's divisibility hints the loads become cp.async (LDGSTS), the int8 dot is wgmma
    assert large["wgmma"] and large["async_copies"] > 0 and large["config"]["BM"] == 128
    assert not decode["wgmma"] and decode["config"]["split_k"] > 1  # M = 1: mma.sync tile, split-K
    for r in (large, decode):
        assert r["baseline"] == "bf16" and 0 < r["instr_per_iter"] == sum(r["loop_mix"].values())
        assert r["prmt_per_iter"] == r["loop_mix"].get("PRMT", 0) == 0  # nibble planes: nothing to permute
    assert had[0]["baseline"] == "memcpy" and had[0]["instr_per_token"] > 0
    assert set(had[0]["stores"]) <= {"STG.E", "STG.E.64", "STG.E.128"}  # no byte stores
    for key, s in doc["summary"].items():
        if key.startswith("hadamard"):
            assert s["target_met"] == (s["instr_per_token"] <= 1000 and s["spill_bytes"] == 0
                                       and set(s["stores"]) <= {"STG.E", "STG.E.64", "STG.E.128"})
            assert s["warp_instr_per_token"] == s["instr_per_token"] * s["warps"]
        else:
            assert s["target_met"] == (s["instr_per_iter"] <= s["limit"] and s["prmt_per_iter"] == 0 and s["spill_bytes"] == 0)
            assert s["limit"] == (110 if "16x" in key else 90)


def test_sass_loop_analysis():
    """The MMA loop is the innermost backward branch holding an MMA; the token loop the outermost."""
    from vllm_qexpand.kernels import aot

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   PRMT R3, R2, 0x7604, R3 ;
        /*0030*/                   IGMMA.64x128x32.S8.S8 R24, R88, gdesc[UR4], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/               @!P5 BRA 0x20 ;
        /*0060*/                   LOP3.LUT R4, R4, 0xf, RZ, 0xc0, !PT ;
        /*0070*/               @P0 BRA 0x10 ;
        /*0080*/                   EXIT ;
    """
    ins = [aot.Instr(int(m.group(1), 16), m.group(2), m.group(0)) for m in aot._LINE.finditer(text)]
    body = aot.mma_loop(ins)
    assert [i.op for i in body] == ["PRMT", "IGMMA.64x128x32.S8.S8", "WARPGROUP.DEPBAR.LE", "BRA"]
    assert len(aot.outer_loop(ins)) == 7
    assert aot.mma_ops(body[1]) == (("GMMA", "S8"), 2 * 64 * 128 * 32 // 4)
    assert aot.issue_cycles(body, 4) == (2 + 1 + 1 + 1) * 4 / 4  # PRMT issues at half rate


# ----------------------------------------------------------------------------- benchmark script


def _bench_module():
    spec = importlib.util.spec_from_file_location("qexpand_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_dry_run(capsys):
    bk = _bench_module()
    rows = bk.plan_rows()
    ks = {r["K"] for r in rows}
    assert {8960, 10240, 12288, 15360, 17920, 14336, 2048} <= ks
    assert {r["M"] for r in rows} == {1, 16, 64, 256, 1024, 4096, 8192}
    assert not [r for r in rows if r["kernel"] == "int_mm" and r["M"] <= 16]
    assert bk.main(["--dry-run", "--models", "1b", "--m", "1"]) == 0
    assert "rows" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert bk.main(["--models", "1b", "--m", "1"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@needs_interpreter
def test_benchmark_code_paths_on_cpu():
    bk = _bench_module()
    meta = {"_model": "tiny", "_layer": "down", "_N_in": 48}
    rows = [{"kernel": kn, "M": 3, "N": 32, "K": 64, "baseline": "cublas_bf16", **meta}
            for kn in ("w4a4", "linear_w4a8", "linear_w4a4_i8")]
    rows.append({"kernel": "hadamard_quant4", "M": 3, "N": 48, "K": 64, "baseline": "memcpy", **meta})
    # weights (or, for hadamard_quant, inputs) cycled over >= 256 MB of copies, baselines too
    assert bk.n_copies(32 * 64 // 2) == 128 and bk.n_copies(2**30) == 1 and bk.n_copies(8 * 2**20) == 32
    bk.MAX_COPIES = 3  # tiny shapes would take 128 copies: keep the interpreter's work small
    calls = []
    res = bk.run(rows, log=lambda *_: None, device="cpu", bench=lambda fns: (calls.append(len(fns)), [f() for f in fns], 2.0)[2])
    assert calls == [3] * 7  # bf16, w4a4; bf16 of the N_in linear, linear_w4a8, linear_w4a4_i8; hadamard_quant4, memcpy
    assert ops.W4A4_CODES == "int4"  # restored after the int8-codes row
    assert [r["kernel"] for r in res] == ["w4a4", "linear_w4a8", "linear_w4a4_i8", "hadamard_quant4"]
    assert set(res[0]) == {"kernel", "M", "N", "K", "ms", "baseline", "baseline_ms", "ratio"}


# ----------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@compiled_gpu
@pytest.mark.parametrize("n,m,k", [(4096, 4096, 1), (14336, 14336, 28), (14336, 17920, 140), (8192, 8960, 140)])
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_hadamard_quant(n, m, k, bits):
    x = _act(257, n, seed=n).to(torch.bfloat16).cuda()
    codes, scale, sums = hq.hadamard_quant(x, m, k, 1, bits)
    ref_codes, ref_scale, _ = hq.hadamard_quant_reference(x.cpu(), m, k, 1, bits)
    _check_codes(codes.cpu(), ref_codes, bits)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-5, atol=0)



@pytest.mark.gpu
@compiled_gpu
@pytest.mark.parametrize("t", [1, 16, 100, 1024])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fast", [True, False])
def test_gpu_w4_gemm(t, bits, fast):
    n, k = 1024, 4096
    a, ascale, asum, wpacked, wscale, bias = _gemm_inputs(t, n, k, bits, 0, seed=t)
    ref = gm.w4_gemm_reference(a, ascale, wpacked, wscale, 0, torch.float64, bias)
    dev = lambda z: z.cuda()  # noqa: E731
    w = gm.repack_for_kernel(dev(wpacked))
    if bits == 8:
        y = gm.w4a8_gemm(dev(a), dev(ascale), dev(asum), w, dev(wscale), 0, torch.float32, dev(bias), config={"fast": fast})
    else:
        ap = dev(quant.pack_int4(a).view(torch.uint8))
        y = gm.w4a4_gemm(ap, dev(ascale), dev(asum), w, gm.weight_code_sums(dev(wpacked)), dev(wscale), 0, torch.float32, dev(bias), config={"fast": fast})
    assert (y.cpu().double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()



def test_first_gpu_run_script_on_cpu(tmp_path, capsys):
    """The one-command first GPU run: all issue-13 steps present; refuses cleanly without CUDA."""
    spec = importlib.util.spec_from_file_location("qexpand_first_gpu_run", ROOT / "benchmarks" / "first_gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [s for s, _ in mod.STEPS] == ["env", "hadamard_quant", "batch_invariance", "gemm", "tp_amax", "capture",
                                         "jit", "configs", "ratios"]
    assert {m for _, m in mod.HADAMARD_SIZES} == {576, 1536, 4096, 8192, 14336, 8960, 10240, 15360, 17920}
    ref = torch.tensor([[0, 1, -2, 3]], dtype=torch.int8)
    assert mod._codes_agree(ref, ref, 8)["ok"] and not mod._codes_agree(ref + 2, ref, 8)["ok"]
    if not torch.cuda.is_available():
        assert mod.main(["--out", str(tmp_path / "x.json")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_signed_nibble_word_trick():
    """The FAST grouped path's 32-bit arithmetic: ((nibble ^ 8) | ((that & 8) * 30)) per byte is nibble - 8."""
    b = torch.arange(2**16, dtype=torch.int64)  # all pairs of bytes, in the low 16 bits of a word
    words = b | (b << 16)
    for shift, ref in ((0, b & 0xF), (4, (b >> 4) & 0xF)):
        x = ((words >> shift) & 0x0F0F0F0F) ^ 0x08080808
        x = (x | ((x & 0x08080808) * 30)) & 0xFFFFFFFF
        for byte in range(4):
            got = ((x >> (8 * byte)) & 0xFF).to(torch.uint8).view(torch.int8).long()
            want = ((words >> (8 * byte + shift)) & 0xF) - 8
            assert torch.equal(got, want)
        assert torch.equal(((x & 0xFF).to(torch.uint8).view(torch.int8)).long(), ref - 8)


@needs_interpreter
def test_first_gpu_run_checks_pass_in_the_interpreter():
    """The first GPU run's checking steps, on CPU with tiny shapes: their logic and thresholds hold."""
    spec = importlib.util.spec_from_file_location("qexpand_first_gpu_run2", ROOT / "benchmarks" / "first_gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.S, mod.DEV = mod.SMALL, "cpu"
    for step in (mod.step_hadamard, mod.step_batch_invariance, mod.step_gemm, mod.step_tp_amax):
        res = step({})
        assert res["ok"], (step.__name__, [r for r in res["rows"] if not r["ok"]])
        assert len(res["rows"]) >= 2


@pytest.mark.gpu
@compiled_gpu
@pytest.mark.parametrize("t", [17, 40, 64])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 128])
def test_gpu_w4_gemm_small_m_and_grouped(t, bits, group):
    """The M 17-64 tile (split-K with the in-kernel reduction) and grouped scales, compiled."""
    n, k = 1024, 4096
    a, ascale, asum, wpacked, wscale, bias = _gemm_inputs(t, n, k, bits, group, seed=t + group)
    ref = gm.w4_gemm_reference(a, ascale, wpacked, wscale, group, torch.float64, bias)
    w = gm.repack_for_kernel(wpacked.cuda())
    if bits == 8:
        y = gm.w4a8_gemm(hq.to_planes(a).cuda(), ascale.cuda(), asum.cuda(), w, wscale.cuda(), group, torch.float32,
                         bias.cuda(), a_planes=True)
    else:
        ap = quant.pack_int4(a).view(torch.uint8).cuda()
        y = gm.w4a4_gemm(ap, ascale.cuda(), asum.cuda(), w, gm.weight_code_sums(wpacked.cuda()), wscale.cuda(), group,
                         torch.float32, bias.cuda())
    assert (y.cpu().double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.gpu
@compiled_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_hadamard_quant_many_tokens_and_batch_invariance(bits):
    """T > 1024 (several tokens per program), plane order, and a token alone == in the batch, compiled."""
    x = _act(1100, 14336, seed=7).to(torch.bfloat16).cuda()
    codes, scale, sums = hq.hadamard_quant(x, 17920, 140, 1, bits, planes=bits == 8)
    ref_codes, ref_scale, _ = hq.hadamard_quant_reference(x.cpu(), 17920, 140, 1, bits)
    _check_codes(hq.from_planes(codes.cpu()) if bits == 8 else codes.cpu(), ref_codes, bits)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-5, atol=0)
    alone = hq.hadamard_quant(x[1037:1038], 17920, 140, 1, bits, planes=bits == 8)
    for a_, b_ in zip(alone, (codes, scale, sums)):
        assert torch.equal(a_[0], b_[1037])
