"""Streaming input statistics for one linear layer: ``XᵀX``, absmax, sample count."""

from __future__ import annotations

import torch

BLOCK = 288  # column block for the triangular product (576 → 2 blocks, 1536 → 5)


class InputStats:
    """Accumulates ``XᵀX`` [in, in] (float32), per-channel |x| max [in], and token count.

    ``XᵀX`` is symmetric, so only the column blocks on and above the diagonal are multiplied
    (3/4 of the work for 576 columns, 3/5 for 1536); :attr:`xtx` mirrors the rest.
    """

    def __init__(self, in_features: int) -> None:
        self._acc = torch.zeros(in_features, in_features)
        self.absmax = torch.zeros(in_features)
        self.count = 0
        n_blocks = max(1, in_features // BLOCK)
        bounds = torch.linspace(0, in_features, n_blocks + 1).round().long().tolist()
        self._blocks = list(zip(bounds[:-1], bounds[1:]))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        if len(self._blocks) == 1:
            self._acc.addmm_(x.t(), x)
        else:
            for a0, a1 in self._blocks:
                xa = x[:, a0:a1].t()
                self._acc[a0:a1, a0:].addmm_(xa, x[:, a0:])
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.count += x.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        """The full symmetric ``XᵀX``."""
        if len(self._blocks) == 1:
            return self._acc
        upper = torch.triu(self._acc)
        return upper + torch.triu(self._acc, diagonal=1).t()
