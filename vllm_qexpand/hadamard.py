"""Hadamard matrices of order K·2^p and the orthonormal transform built on them.

This module is the single home of the rotation math. The converter fuses these
transforms into weights; the torch reference, the CPU serving path and the Triton
kernels apply the *same* transform online:

    T_M(v) = v @ (H_K ⊗ H_P).T / sqrt(M),   M = K·P,  P = 2^p

where H_P is the Sylvester Hadamard matrix (natural order) and H_K is the
Paley-construction matrix returned by ``hadamard_k(K)``. Viewing v as a K×P
matrix V (row-major), T_M(v) = H_K @ V @ H_P.T / sqrt(M): a fast Walsh–Hadamard
transform of length P on each of the K rows, then a K×K mix across rows.
"""
from __future__ import annotations

import functools
import math

import torch

# K factors for which a ±1 Hadamard matrix is built here (Paley I / II, with a
# Sylvester doubling for 40). K = 1 means a pure power of two.
KNOWN_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 152)
# Factors the size rule of the expansion method (Franco et al., Brevitas) steps
# through. 156 and 172 are left out: no construction for them is implemented.
EXPANSION_K = (12, 20, 28, 36, 40, 52, 60, 108, 140, 152)

# (K, construction, q): Paley I gives order q+1 for q ≡ 3 (mod 4);
# Paley II gives order 2(q+1) for q ≡ 1 (mod 4); q is a prime or prime power.
_CONSTRUCTION = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    152: ("paley1", 151),
}


def _prime_power(q: int) -> tuple[int, int]:
    for p in range(2, q + 1):
        if q % p == 0:
            n, r = 0, q
            while r % p == 0:
                r //= p
                n += 1
            if r != 1:
                raise ValueError(f"{q} is not a prime power")
            return p, n
    raise ValueError(f"{q} is not a prime power")


def _field_elements(q: int) -> list[tuple[int, ...]]:
    """Elements of GF(q) as coefficient tuples (constant term first)."""
    p, n = _prime_power(q)
    elems = []
    for i in range(q):
        digits = []
        for _ in range(n):
            digits.append(i % p)
            i //= p
        elems.append(tuple(digits))
    return elems


def _quadratic_character(q: int) -> list[list[int]]:
    """chi(a - b) for all field elements a, b (Legendre symbol over GF(q))."""
    p, n = _prime_power(q)
    elems = _field_elements(q)
    index = {e: i for i, e in enumerate(elems)}

    if n == 1:
        mul = lambda a, b: ((a[0] * b[0]) % p,)  # noqa: E731
    else:
        # smallest monic irreducible polynomial of degree n (n <= 2 is all we need)
        if n != 2:
            raise ValueError(f"GF({q}) with degree {n} is not supported")
        c = next(c for c in range(p) if all((x * x - c) % p for x in range(p)))

        def mul(a, b):  # x^2 = c
            return ((a[0] * b[0] + c * a[1] * b[1]) % p, (a[0] * b[1] + a[1] * b[0]) % p)

    squares = set()
    for e in elems[1:]:
        squares.add(mul(e, e))
    chi = []
    for a in elems:
        row = []
        for b in elems:
            d = tuple((x - y) % p for x, y in zip(a, b))
            row.append(0 if index[d] == 0 else (1 if d in squares else -1))
        chi.append(row)
    return chi


def _paley1(q: int) -> torch.Tensor:
    chi = torch.tensor(_quadratic_character(q), dtype=torch.float64)
    n = q + 1
    # Jacobsthal matrix Q (skew for q ≡ 3 mod 4); H = I + S with S = [[0, 1], [-1, Q]]
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = chi
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    chi = torch.tensor(_quadratic_character(q), dtype=torch.float64)
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = chi  # symmetric conference matrix
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, b) + torch.kron(torch.eye(n, dtype=torch.float64), a)


@functools.lru_cache(maxsize=None)
def _hadamard_k_cached(k: int) -> torch.Tensor:
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if k == 40:
        return torch.kron(sylvester(2).double(), _hadamard_k_cached(20))
    if k not in _CONSTRUCTION:
        raise ValueError(f"no Hadamard matrix of order {k} is known here; known: {KNOWN_K}")
    kind, q = _CONSTRUCTION[k]
    h = _paley1(q) if kind == "paley1" else _paley2(q)
    # normalise so the first row and column are all +1 (a fixed, documented form)
    h = h * h[0:1, :].sign()
    h = h * h[:, 0:1].sign()
    return h


def hadamard_k(k: int) -> torch.Tensor:
    """The ±1 Hadamard matrix H_K (float64, K×K) used for the factor K."""
    return _hadamard_k_cached(k).clone()


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n = 2^p in natural order (float64)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factor(n: int) -> tuple[int, int] | None:
    """Split n = K·P with K in KNOWN_K and P a power of two; None if impossible.

    The K used is the smallest one that works (unique apart from 20 vs 40,
    where 20 is taken).
    """
    for k in KNOWN_K:
        if n % k == 0:
            p = n // k
            if p & (p - 1) == 0:
                return k, p
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """Dense orthonormal matrix A = (H_K ⊗ H_P)/sqrt(n) (float64). Tests and offline use only."""
    kp = factor(n)
    if kp is None:
        raise ValueError(f"no Hadamard matrix of size {n} (needs K·2^p with K in {KNOWN_K})")
    k, p = kp
    return torch.kron(hadamard_k(k), sylvester(p)) / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Seeded random orthogonal matrix (float64, QR of a Gaussian with sign fix)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform over the last dim (x @ H_P.T, natural order)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT length must be a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, k: int, hk: torch.Tensor | None = None) -> torch.Tensor:
    """T_M(x) over the last dim, M = x.shape[-1] = K·P. Never forms an M×M matrix.

    ``hk`` is H_K in x's dtype (pass a cached copy on hot paths).
    """
    m = x.shape[-1]
    p = m // k
    if hk is None:
        hk = hadamard_k(k)
    hk = hk.to(device=x.device, dtype=x.dtype)  # no-op on the hot path (a cached copy on x's device)
    lead = x.shape[:-1]
    y = fwht(x.reshape(*lead, k, p))
    if k > 1:
        y = _hk_apply(hk, y)
    return y.reshape(*lead, m) * (1.0 / math.sqrt(m))


def _hk_apply(hk: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H_K @ y over dim -2 of y (..., K, P), summing the K terms in one fixed order.

    Each output is ((h_i0·y_0 + h_i1·y_1) + h_i2·y_2) + ...: products with ±1 are exact and the
    additions run in the same order for every row, so a token's result does not depend on how
    many tokens are transformed with it (a batched ``matmul`` picks its blocking, hence its
    summation order, by shape; see docs/serving.md, "Batch invariance").
    """
    k = hk.shape[0]
    h = hk.reshape(k, k, 1)  # [i, j, 1]
    acc = h[:, 0] * y[..., 0:1, :]
    for j in range(1, k):
        acc = acc + h[:, j] * y[..., j : j + 1, :]
    return acc


def next_size(n: int, steps: int = 1, multiple: int = 1) -> int:
    """Expansion size rule: `steps` times, the smallest K·2^p (K in EXPANSION_K) strictly above.

    `multiple`: only sizes divisible by it count (the converter asks for 8, the int4
    packing unit; at real widths every candidate already is).
    """
    for _ in range(steps):
        best = None
        for k in EXPANSION_K:
            p = 1
            while k * p <= n or (k * p) % multiple:
                p *= 2
            if best is None or k * p < best:
                best = k * p
        n = best
    return n
