import pytest
import torch

from vllm_qexpand import quant as Q


def test_pack_unpack_round_trip_and_layout():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    p = Q.pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (7, 8)
    assert torch.equal(Q.unpack_int4(p), q)
    # documented layout: nibble j of word w is input 8w+j, stored as value + 8
    one = torch.full((1, 8), -8, dtype=torch.int8)
    one[0, 3] = 7  # stored 15 at bits 12..15, all others 0
    assert Q.pack_int4(one).item() == 15 << 12
    assert Q.pack_int4(torch.full((1, 8), 7, dtype=torch.int8)).item() == -1  # 0xFFFFFFFF


def test_pack_rejects_ragged_width():
    with pytest.raises(ValueError, match="multiple of 8"):
        Q.pack_int4(torch.zeros(2, 12, dtype=torch.int8))


@pytest.mark.parametrize("group", [0, 32])
def test_weight_quantizer_range_and_symmetry(group):
    w = torch.randn(16, 128)
    s = Q.weight_scale(w, group)
    assert s.shape == ((16, 1) if group == 0 else (16, 4))
    q = Q.quantize_weight(w, s, group)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    # symmetric: negating the weight negates the codes except at the -8 end
    qn = Q.quantize_weight(-w, s, group)
    assert torch.equal(qn.clamp(max=7), (-q.int()).clamp(-8, 7).to(torch.int8))
    # the absmax element maps to ±7 exactly
    i = w.abs().argmax(dim=1)
    if group == 0:
        assert torch.equal(q[torch.arange(16), i].abs(), torch.full((16,), 7, dtype=torch.int8))
    err = (Q.dequantize_weight(q, s, group) - w).abs()
    assert bool((err <= s.repeat_interleave(group or 128, dim=1) / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantizer(bits):
    x = torch.randn(5, 40)
    q, s = Q.quantize_activation(x, bits)
    qm = 2 ** (bits - 1) - 1
    assert s.shape == (5, 1)
    assert float(q.abs().max()) <= qm and torch.equal(q, q.round())
    assert torch.allclose(q.abs().amax(1), torch.full((5,), float(qm)))
    assert (Q.fake_quantize_activation(x, bits) - x).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_clip_saturates_the_tail_and_refines_the_rest(bits):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    x[:, 5] = 9.0  # one large value per token
    qm = 2 ** (bits - 1) - 1
    q1, s1 = Q.quantize_activation(x, bits)
    q, s = Q.quantize_activation(x, bits, clip=0.8)
    # scale = (max * clip) / qmax, in float32, in that order
    assert torch.equal(s, (x.abs().amax(1, keepdim=True) * torch.tensor(0.8)) / qm)
    assert bool((s < s1).all())
    assert float(q.max()) == qm and float(q.min()) >= -qm - 1  # the large value saturates at the end code
    inside = x.abs() <= 0.8 * x.abs().amax(1, keepdim=True) * (1 - 1e-6)
    err = (q * s - x).abs()
    assert bool((err[inside] <= s.expand_as(x)[inside] / 2 + 1e-6).all())  # a finer step for the rest
    assert (err[inside].mean() < (q1 * s1 - x).abs()[inside].mean())
    # clip 1 is the unclipped rule, bit for bit
    q_one, s_one = Q.quantize_activation(x, bits, clip=1.0)
    assert torch.equal(q_one, q1) and torch.equal(s_one, s1)
    # the linear applies it too
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(Q.qlinear(x, w, act_bits=bits, act_clip=0.8), Q.qlinear(x, w, act_bits=bits))
    torch.testing.assert_close(Q.qlinear(x, w, act_bits=bits, act_clip=0.8), (q * s) @ w.t())


def test_zero_rows_are_safe():
    q, s = Q.quantize_activation(torch.zeros(2, 8), 4)
    assert torch.equal(q, torch.zeros(2, 8)) and bool((s > 0).all())
    assert bool((Q.weight_scale(torch.zeros(3, 8)) > 0).all())


def test_qlinear_expanded_rotation_is_exact_without_quantization():
    from vllm_qexpand.hadamard import hadamard_transform

    x, w = torch.randn(4, 192, dtype=torch.float64), torch.randn(8, 192, dtype=torch.float64)
    wexp = hadamard_transform(torch.nn.functional.pad(w, (0, 16)), 52)  # 192 -> 208 = 52·4
    y = Q.qlinear(x.float(), wexp.float(), act_bits=None, rotation=(208, 52))
    assert torch.allclose(y.double(), x @ w.t(), atol=1e-4)


def test_block_diagonal_rotation_is_local_and_orthogonal():
    x = torch.randn(3, 384, dtype=torch.float64)  # 2 blocks of 192 -> 208 = 52·4 each
    y = Q.online_rotate(x, 416, 52, blocks=2)
    assert y.shape == (3, 416)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    x2 = x.clone()
    x2[:, 192:] = torch.randn(3, 192, dtype=torch.float64)  # change block 1 only
    y2 = Q.online_rotate(x2, 416, 52, blocks=2)
    assert torch.equal(y[:, :208], y2[:, :208]) and not torch.allclose(y[:, 208:], y2[:, 208:])
    assert torch.allclose(y[:, :208], Q.online_rotate(x[:, :192], 208, 52))


@pytest.mark.parametrize("rule", ["none", "mse", "kl-j"])
@pytest.mark.parametrize("group", [0, 64])
def test_clip_rules_give_valid_scales_and_mse_beats_absmax(rule, group):
    from vllm_qexpand.converters.clip import choose_scale

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((32, 256))  # heavy tails: clipping pays
    s = choose_scale(w, group, rule)
    assert s.shape == (32, 1 if group == 0 else 4) and bool((s > 0).all()) and bool(torch.isfinite(s).all())
    absmax = choose_scale(w, group, "none")
    assert bool((s <= absmax * (1 + 1e-6)).all())  # a clip never widens the range
    err = lambda sc: ((Q.dequantize_weight(Q.quantize_weight(w, sc, group), sc, group) - w) ** 2).sum()  # noqa: E731
    if rule == "mse" or (rule == "kl-j" and group == 0):
        assert err(s) < err(absmax)
    # kl-j on groups of 64 has 8 histogram bins: no candidate below absmax (as Settle et al.'s guard)
