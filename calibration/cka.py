"""Centered kernel alignment (CKA) between every pair of experts of one layer, vectorised.

    from sere.calibration.cka import cka_matrix
    sim = cka_matrix(outputs, kernel="linear")     # outputs: E, N, D -> sim: E, E

Letters: E = experts, N = calibration tokens, D = hidden size (or random features), B = a
block of token rows. CKA(i, j) = <HK_iH, HK_jH> / (|HK_iH| |HK_jH|) with K_e the N x N kernel
Gram of expert e's outputs and H the centering matrix (Kornblith et al. 2019).

Kernels (each invariant to scaling an expert's outputs, so a scaled copy scores 1):
- linear: K = Yc Yc^T, Yc = outputs centered over tokens.
- rbf: K = exp(-|a - b|^2 / (2 s^2)), s^2 = median squared distance between tokens
  (off-diagonal; at most RBF_MEDIAN_TOKENS evenly spaced tokens); optionally approximated
  with random Fourier features (`rbf_features=F`), which turns it into linear CKA on F features.
- polynomial: K = (g <a, b> + 1)^3 on centered outputs, g = 1 / mean |a|^2.
An expert whose centered Gram is zero (constant output, e.g. all zero) has CKA 0 with every
other expert; the diagonal is 1.

`cka_pairwise` is the plain per-pair loop the vectorised version is checked (and benched)
against.
"""
from __future__ import annotations

import math

import torch

from sere.calibration.finalize import finalize_similarity

KERNELS = ("linear", "rbf", "polynomial")
POLY_DEGREE = 3
RBF_MEDIAN_TOKENS = 1024
DEFAULT_BLOCK_ELEMENTS = 1 << 28  # ~1 GB of float32 per intermediate block


# ---------------------------------------------------------------------------- kernel pieces


def center_tokens(y: torch.Tensor) -> torch.Tensor:
    return y - y.mean(dim=-2, keepdim=True)  # ..., N, D


def rbf_sigma2(y: torch.Tensor) -> torch.Tensor:
    """Median squared distance between distinct tokens, per expert: [E, N, D] -> [E].

    Beyond RBF_MEDIAN_TOKENS tokens it is estimated on evenly spaced tokens (the full median
    would need all N^2 / 2 distances). The lower median, as torch.median returns.
    """
    n = y.shape[-2]
    if n > RBF_MEDIAN_TOKENS:
        idx = torch.linspace(0, n - 1, RBF_MEDIAN_TOKENS, device=y.device).round().long()
        y = y[..., idx, :]  # E, n, D
        n = RBF_MEDIAN_TOKENS
    if n < 2:
        return torch.zeros(y.shape[:-2], dtype=y.dtype, device=y.device)
    d2 = torch.cdist(y, y).square()  # E, n, n
    iu = torch.triu_indices(n, n, offset=1, device=y.device)
    return d2[..., iu[0], iu[1]].median(dim=-1).values  # E


def poly_gamma(yc: torch.Tensor) -> torch.Tensor:
    """1 / mean squared token norm of centered outputs, per expert ([E, N, D] -> [E]); 0 if all zero."""
    ms = yc.square().sum(-1).mean(-1)  # E
    return torch.where(ms > 0, 1.0 / ms.clamp_min(torch.finfo(ms.dtype).tiny), torch.zeros_like(ms))


def rbf_from_sq_dist(d2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """exp(-d2 / (2 s^2)); a zero bandwidth (all tokens equal) gives the constant kernel 1."""
    s2 = sigma2.reshape(sigma2.shape + (1,) * (d2.dim() - sigma2.dim()))
    k = torch.exp(-d2 / (2 * s2.clamp_min(torch.finfo(d2.dtype).tiny)))
    return torch.where(s2 > 0, k, torch.ones_like(k))


def random_fourier_features(y: torch.Tensor, num_features: int, *, seed: int = 0) -> torch.Tensor:
    """Features whose inner products approximate the rbf kernel above: [E, N, D] -> [E, N, F].

    phi(a) = sqrt(2 / F) cos(W a / s + b), W ~ N(0, 1), b ~ U(0, 2 pi); one draw shared by all
    experts (seeded), each expert scaled by its own bandwidth s.
    """
    e, n, d = y.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(d, num_features, generator=gen, dtype=torch.float64).to(y.device, y.dtype)  # D, F
    b = (torch.rand(num_features, generator=gen, dtype=torch.float64) * 2 * math.pi).to(y.device, y.dtype)
    sigma = rbf_sigma2(y).sqrt()  # E
    scale = torch.where(sigma > 0, 1.0 / sigma.clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(sigma))
    proj = torch.matmul(y, w) * scale[:, None, None]  # E, N, F
    return math.sqrt(2.0 / num_features) * torch.cos(proj + b)  # E, N, F


# ---------------------------------------------------------------------------- vectorised CKA


def cka_matrix(
    outputs: torch.Tensor,
    kernel: str = "linear",
    *,
    rbf_features: int | None = None,
    seed: int = 0,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """CKA of every expert pair: outputs [E, N, D] -> [E, E] float32 in [0, 1], diagonal 1.

    No loop over pairs: the cross-HSIC of all pairs is one Gram-of-Grams built from blocks of
    token rows (or, when cheaper, from feature cross-covariances).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if outputs.dim() != 3:
        raise ValueError(f"outputs must be [experts, tokens, hidden], got shape {tuple(outputs.shape)}")
    if outputs.shape[1] < 2:
        raise ValueError(f"CKA needs at least 2 tokens, got {outputs.shape[1]}")
    y = outputs.float()  # E, N, D
    if kernel == "linear":
        hsic = linear_hsic_matrix(center_tokens(y), block_elements=block_elements)
    elif kernel == "rbf" and rbf_features:
        phi = random_fourier_features(y, rbf_features, seed=seed)  # E, N, F
        hsic = linear_hsic_matrix(center_tokens(phi), block_elements=block_elements)
    else:
        hsic = gram_hsic_matrix(y, kernel, block_elements=block_elements)
    return hsic_to_cka(hsic)


def hsic_to_cka(hsic: torch.Tensor) -> torch.Tensor:
    """Normalise an [E, E] cross-HSIC matrix; experts with zero self-HSIC get 0 off-diagonal."""
    self_hsic = hsic.diagonal().clamp_min(0)  # E
    live = self_hsic > 0
    denom = (self_hsic[:, None] * self_hsic[None, :]).sqrt()  # E, E
    both = live[:, None] & live[None, :]
    cka = torch.where(both, hsic / torch.where(both, denom, torch.ones_like(denom)), torch.zeros_like(hsic))
    return finalize_similarity(cka)


def linear_hsic_matrix(yc: torch.Tensor, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
    """<K_i, K_j> for K_e = yc_e yc_e^T, all pairs: [E, N, D] (already centered) -> [E, E] float64.

    Equal to |yc_i^T yc_j|_F^2; picks the cheaper of the token-Gram form (N^2 per expert) and
    the feature cross-covariance form (D^2 per pair).
    """
    e, n, d = yc.shape
    gram_cost = (e * n * n * d + e * e * n * n) / 2  # upper half of the Grams only
    feature_cost = e * e * n * d * d / 2
    if feature_cost < gram_cost:
        return _feature_cross_hsic(yc, block_elements)
    return _gram_cross_hsic(yc, block_elements)


def _upper_row_blocks(e: int, n: int, block_elements: int):
    """(start, stop) of token-row blocks; each block takes columns start..N of a symmetric Gram."""
    rows = max(1, block_elements // (e * n))
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _accumulate_symmetric(acc: torch.Tensor, k: torch.Tensor) -> None:
    """acc += <K_i, K_j> over one row block of symmetric Grams K, given as k = K[:, rows, start:].

    The block's square part (columns of its own rows) counts once; the part right of it
    stands for itself and its mirror image below the diagonal, so it counts twice.
    """
    e, b, _ = k.shape
    square = k[:, :, :b].reshape(e, -1)  # E, B*B
    acc += (square @ square.T).double()
    if k.shape[2] > b:
        right = k[:, :, b:].reshape(e, -1)  # E, B*(N - stop)
        acc += 2 * (right @ right.T).double()


def _gram_cross_hsic(yc: torch.Tensor, block_elements: int) -> torch.Tensor:
    e, n, _ = yc.shape
    ycT = yc.transpose(1, 2)  # E, D, N
    acc = torch.zeros(e, e, dtype=torch.float64, device=yc.device)
    # Grams are symmetric: only blocks on or right of the diagonal are computed (half the work).
    for start, stop in _upper_row_blocks(e, n, block_elements):
        k = torch.bmm(yc[:, start:stop], ycT[:, :, start:])  # E, B, N - start
        _accumulate_symmetric(acc, k)
    return acc


def _feature_cross_hsic(yc: torch.Tensor, block_elements: int) -> torch.Tensor:
    e, n, d = yc.shape
    flat = yc.permute(1, 0, 2).reshape(n, e * d)  # N, E*D
    chunk = max(1, block_elements // (e * d * d))  # experts i per step
    acc = torch.empty(e, e, dtype=torch.float64, device=yc.device)
    for start in range(0, e, chunk):
        stop = min(e, start + chunk)
        cross = flat[:, start * d : stop * d].T @ flat  # (c*D), (E*D): yc_i^T yc_j for i in chunk
        acc[start:stop] = cross.reshape(stop - start, d, e, d).square().sum(dim=(1, 3)).double()  # c, E
    return acc


def gram_hsic_matrix(
    y: torch.Tensor, kernel: str, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> torch.Tensor:
    """<HK_iH, HK_jH> for rbf / polynomial Grams, all pairs: [E, N, D] -> [E, E] float64.

    Two passes over blocks of token rows: the first gets every Gram's row means (centering
    needs them), the second centers each block exactly and accumulates block Gram products,
    so no N x N Gram of any expert is ever held whole; both use only the upper half.
    """
    e, n, _ = y.shape
    if kernel == "polynomial":
        y = center_tokens(y)
        param = poly_gamma(y)  # E
    else:
        param = rbf_sigma2(y)  # E
    sq_norms = y.square().sum(-1)  # E, N
    yT = y.transpose(1, 2)  # E, D, N
    blocks = _upper_row_blocks(e, n, block_elements)

    def gram_block(start: int, stop: int) -> torch.Tensor:  # K[:, start:stop, start:]
        dots = torch.bmm(y[:, start:stop], yT[:, :, start:])  # E, B, N - start
        if kernel == "polynomial":
            return (param[:, None, None] * dots + 1.0).pow(POLY_DEGREE)
        d2 = (sq_norms[:, start:stop, None] + sq_norms[:, None, start:] - 2 * dots).clamp_min(0)
        return rbf_from_sq_dist(d2, param)

    # Pass 1: row sums. A block's rows get its row sums; by symmetry, the rows below the block
    # get the column sums of its part right of the diagonal square.
    row_sum = torch.zeros(e, n, dtype=torch.float64, device=y.device)
    for start, stop in blocks:
        k = gram_block(start, stop)  # E, B, N - start
        row_sum[:, start:stop] += k.sum(-1)
        row_sum[:, stop:] += k[:, :, stop - start :].sum(1)
    row_mean = (row_sum / n).to(y.dtype)  # E, N
    grand_mean = (row_sum.sum(-1) / (n * n)).to(y.dtype)  # E
    # Pass 2: center each block exactly, H K H = K - row mean - column mean + grand mean,
    # and accumulate the Gram products.
    acc = torch.zeros(e, e, dtype=torch.float64, device=y.device)
    for start, stop in blocks:
        k = gram_block(start, stop)
        k = k - row_mean[:, start:stop, None] - row_mean[:, None, start:] + grand_mean[:, None, None]
        _accumulate_symmetric(acc, k)
    return acc


# ---------------------------------------------------------------------------- pairwise reference


def cka_pair(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", *, rbf_features: int | None = None) -> float:
    """CKA of two experts' outputs [N, D], the textbook way; 0 if either side is constant."""
    if kernel == "linear":
        xc, yc = center_tokens(x), center_tokens(y)
        cross = (yc.T @ xc).square().sum()
        self_x, self_y = (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()
    else:
        if kernel == "rbf" and rbf_features:
            phi = random_fourier_features(torch.stack([x, y]), rbf_features)  # 2, N, F
            return cka_pair(phi[0], phi[1], "linear")
        kx, ky = _centered_gram(x, kernel), _centered_gram(y, kernel)
        cross, self_x, self_y = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    if self_x <= 0 or self_y <= 0:
        return 0.0
    return float(cross / torch.sqrt(self_x * self_y))


def _centered_gram(x: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "rbf":
        k = rbf_from_sq_dist(torch.cdist(x, x).square(), rbf_sigma2(x[None])[0])
    elif kernel == "polynomial":
        xc = center_tokens(x)
        k = (poly_gamma(xc[None])[0] * (xc @ xc.T) + 1.0).pow(POLY_DEGREE)
    else:
        raise ValueError(f"unknown CKA kernel {kernel!r}")
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka_pairwise(outputs: torch.Tensor, kernel: str = "linear", *, rbf_features: int | None = None, pairs=None) -> torch.Tensor:
    """Reference: a Python loop over expert pairs (i <= j), one cka_pair each. [E, N, D] -> [E, E].

    `pairs` restricts the loop to the given (i, j) list (benchmarks time a sample of pairs).
    """
    e = outputs.shape[0]
    sim = torch.eye(e, dtype=torch.float32)
    for i, j in pairs if pairs is not None else ((i, j) for i in range(e) for j in range(i, e)):
        if i != j:
            sim[i, j] = sim[j, i] = cka_pair(outputs[i], outputs[j], kernel, rbf_features=rbf_features)
    return sim.clamp(0, 1).fill_diagonal_(1.0)
