import math

import pytest
import torch

from vllm_qexpand import hadamard as H


@pytest.mark.parametrize("k", H.KNOWN_K)
def test_every_hadamard_k_is_hadamard(k):
    h = H.hadamard_k(k)
    assert h.shape == (k, k)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.t(), k * torch.eye(k, dtype=h.dtype))
    assert bool((h[0] == 1).all()) and bool((h[:, 0] == 1).all())  # documented normal form


@pytest.mark.parametrize("n", [1, 2, 64, 576, 1536, 1664, 2240])
def test_transform_matches_dense_and_is_orthonormal(n):
    a = H.hadamard_matrix(n)
    assert torch.allclose(a @ a.t(), torch.eye(n, dtype=a.dtype), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    k, _ = H.factor(n)
    assert torch.allclose(H.hadamard_transform(x, k), x @ a.t(), atol=1e-10)


def test_factor_and_refusal():
    assert H.factor(576) == (36, 16)
    assert H.factor(1536) == (12, 128)
    assert H.factor(4096) == (1, 4096)
    assert H.factor(8704) is None  # 68·128: no H_68 here
    with pytest.raises(ValueError, match="8704"):
        H.hadamard_matrix(8704)


def test_size_rule_steps():
    # the Franco et al. ladder for Llama-3.2-1B down_proj, without the 156/172 factors
    assert [H.next_size(8192, s) for s in (1, 2, 3, 4, 5)] == [8960, 9216, 9728, 10240, 12288]
    assert H.next_size(1536, 1) == 1664  # 52·32
    for n in (576, 1536, 2048, 14336):
        m = H.next_size(n)
        assert m > n and H.factor(m) is not None
        assert not any(n < k * 2**p < m for k in H.EXPANSION_K for p in range(0, 16))


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        H.fwht(torch.zeros(3, 12))


def test_random_orthogonal_is_seeded():
    a, b = H.random_orthogonal(10, 1), H.random_orthogonal(10, 1)
    assert torch.equal(a, b)
    assert torch.allclose(a @ a.t(), torch.eye(10, dtype=a.dtype), atol=1e-12)
    assert not torch.equal(a, H.random_orthogonal(10, 2))
