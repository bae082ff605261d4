"""Token-wise expert similarities that accumulate over batches: cosine and Frobenius.

    acc = CosineAccumulator(num_experts)
    for outputs in batches:          # outputs: E, T, D (every expert on the same T tokens)
        acc.update(outputs)
    sim = acc.result()               # E, E float32 in [0, 1], diagonal 1

- cosine: mean over tokens of cos(y_i(t), y_j(t)), mapped to [0, 1] by (c + 1) / 2. A zero
  output vector has cosine 0 with anything (torch's convention), i.e. 0.5 after mapping.
- frobenius: 1 - |Y_i - Y_j|_F / (largest such distance in the layer); all experts equal -> 1.
Both keep only an [E, E] float64 sum, so memory does not grow with the data. No loop over
pairs: one matmul per batch. The `*_pairwise` functions are the plain per-pair loops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sere.calibration.finalize import finalize_similarity

# Cap on elements converted to float64 at once (outputs are processed in token chunks).
DEFAULT_CHUNK_ELEMENTS = 1 << 26
COSINE_EPS = 1e-8


class _PairGramAccumulator:
    """Sum over tokens of an [E, E] Gram of per-token expert vectors, in float64."""

    def __init__(self, num_experts: int, device=None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.num_experts = num_experts
        self.gram = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=device)
        self.tokens = 0
        self.chunk_elements = chunk_elements

    def _vectors(self, chunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor) -> None:
        if outputs.dim() != 3 or outputs.shape[0] != self.num_experts:
            raise ValueError(
                f"outputs must be [{self.num_experts}, tokens, hidden], got shape {tuple(outputs.shape)}"
            )
        e, t, d = outputs.shape
        if self.gram.device != outputs.device:
            self.gram = self.gram.to(outputs.device)
        step = max(1, self.chunk_elements // (e * d))
        for start in range(0, t, step):
            v = self._vectors(outputs[:, start : start + step].double())  # E, c, D
            flat = v.reshape(e, -1)  # E, c*D
            self.gram += flat @ flat.T  # E, E
        self.tokens += t

    def _require_tokens(self) -> None:
        if self.tokens == 0:
            raise ValueError("no tokens were accumulated")


class CosineAccumulator(_PairGramAccumulator):
    def _vectors(self, chunk):
        return chunk / chunk.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)  # E, c, D unit rows

    def result(self) -> torch.Tensor:
        self._require_tokens()
        return finalize_similarity((self.gram / self.tokens + 1) / 2)


class FrobeniusAccumulator(_PairGramAccumulator):
    def _vectors(self, chunk):
        # Distances do not change when every expert's output at a token is shifted by the same
        # vector; removing the per-token mean over experts keeps the Gram small and the
        # |a|^2 + |b|^2 - 2ab difference below free of cancellation for near-equal experts.
        return chunk - chunk.mean(dim=0, keepdim=True)  # E, c, D

    def result(self) -> torch.Tensor:
        self._require_tokens()
        sq = self.gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * self.gram).clamp_min(0).sqrt()  # E, E
        return finalize_similarity(frobenius_from_distances(dist))


def frobenius_from_distances(dist: torch.Tensor) -> torch.Tensor:
    largest = dist.max()
    if largest <= 0:
        return torch.ones_like(dist)
    return 1 - dist / largest


def cosine_matrix(outputs: torch.Tensor) -> torch.Tensor:
    acc = CosineAccumulator(outputs.shape[0], outputs.device)
    acc.update(outputs)
    return acc.result()


def frobenius_matrix(outputs: torch.Tensor) -> torch.Tensor:
    acc = FrobeniusAccumulator(outputs.shape[0], outputs.device)
    acc.update(outputs)
    return acc.result()


# ---------------------------------------------------------------------------- pairwise reference


def cosine_pairwise(outputs: torch.Tensor, pairs=None) -> torch.Tensor:
    """Reference: per pair, torch's per-token cosine averaged over tokens. [E, N, D] -> [E, E]."""
    e = outputs.shape[0]
    sim = torch.eye(e, dtype=torch.float32)
    for i, j in pairs if pairs is not None else ((i, j) for i in range(e) for j in range(i + 1, e)):
        c = F.cosine_similarity(outputs[i], outputs[j], dim=-1, eps=COSINE_EPS).mean()
        sim[i, j] = sim[j, i] = float((c + 1) / 2)
    return sim.clamp(0, 1).fill_diagonal_(1.0)


def frobenius_pairwise(outputs: torch.Tensor, pairs=None) -> torch.Tensor:
    """Reference: per pair, |Y_i - Y_j|_F; then normalised by the largest. [E, N, D] -> [E, E]."""
    e = outputs.shape[0]
    dist = torch.zeros(e, e, dtype=torch.float64)
    for i, j in pairs if pairs is not None else ((i, j) for i in range(e) for j in range(i + 1, e)):
        dist[i, j] = dist[j, i] = float(torch.linalg.matrix_norm(outputs[i] - outputs[j]))
    return frobenius_from_distances(dist).float().clamp(0, 1).fill_diagonal_(1.0)
