"""Shared builders of random routing cases for the routing tests (fresh inputs per case).

Index letters: T = tokens, k = experts per token, E = experts.
"""
from __future__ import annotations

import numpy as np
import torch


def random_topk_ids(rng: np.random.Generator, T: int, E: int, k: int, *, invalid_frac: float = 0.0,
                    dtype=torch.int64) -> torch.Tensor:
    """[T, k] ids with distinct valid experts per token (as top-k gives), and optionally a share
    of invalid ids (-1 padding and ids >= E, as expert-parallel masking produces)."""
    ids = np.stack([rng.choice(E, size=k, replace=k > E) for _ in range(T)]) if T else np.zeros((0, k), int)
    if invalid_frac > 0 and ids.size:
        hit = rng.random(ids.shape) < invalid_frac
        ids = np.where(hit, rng.choice([-1, E, E + 7], size=ids.shape), ids)
    return torch.from_numpy(ids.astype(np.int64)).to(dtype)  # T, k


def random_similarity(rng: np.random.Generator, E: int, *, ties: bool = False,
                      dtype=torch.float32) -> torch.Tensor:
    """[E, E] symmetric similarity in [0, 1] with unit diagonal; `ties` quantises the values
    to a few levels so that argmax ties are frequent."""
    a = rng.random((E, E))
    if ties:
        a = np.round(a * 4) / 4
    sim = (a + a.T) / 2
    np.fill_diagonal(sim, 1.0)
    return torch.from_numpy(sim.astype(np.float32)).to(dtype)  # E, E
