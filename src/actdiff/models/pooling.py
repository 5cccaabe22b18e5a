"""Mask-weighted mean pooling and L2 normalisation (sentence-transformers' Pooling + Normalize).

A module with taps so the reference dump records ``pooled`` and ``embedding`` with forward hooks like
every other node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nomic_moe import Tap


class MeanPoolNormalize(nn.Module):
    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.pooled = Tap()
        self.embedding = Tap()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden is (B, S, H), attention_mask is (B, S) with 1 for real tokens
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = self.pooled((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9))
        return self.embedding(F.normalize(pooled, p=2, dim=-1, eps=self.eps))
