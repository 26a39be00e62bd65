"""Pooling: frames (B, T, D) + padding mask (B, T) -> one speaker embedding, ignoring padded frames.

Each pooling module has `out_dim(dim)`: the embedding width it produces from frames of width dim (dim,
or 2 x dim for statistics).

The HW4 reference averaged padded frames into the mean, so a prediction depended on what else was in
the batch; here padded frames get exactly zero weight.
"""

import torch
from torch import nn


class MeanPooling(nn.Module):
    """Average over each utterance's valid frames."""

    @staticmethod
    def out_dim(dim: int) -> int:
        return dim

    def forward(self, frames: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        counts = pad_mask.logical_not().sum(dim=1, keepdim=True)  # (B, 1)
        # masked_fill, not a multiply by the mask: 0 * inf would still be nan.
        return frames.masked_fill(pad_mask.unsqueeze(-1), 0.0).sum(dim=1) / counts  # (B, D)


class AttentivePooling(nn.Module):
    """Self-attentive pooling (SAP, Cai et al. 2018): frame weights softmax_t(v . tanh(W h_t + b)), masked."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        # No bias: it would add the same constant to every frame's score, which softmax cancels.
        self.score = nn.Linear(dim, 1, bias=False)

    @staticmethod
    def out_dim(dim: int) -> int:
        return dim

    def weights(self, frames: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Frame weights (B, T) in fp32, exactly 0 at padded frames, summing to 1."""
        scores = self.score(torch.tanh(self.proj(frames))).squeeze(-1)  # (B, T)
        # -inf gives padded frames a weight of exactly 0 (and 0 * a finite frame adds nothing).
        # Softmax in fp32: under autocast the scores are bf16, too coarse for the exp-and-normalise.
        return scores.masked_fill(pad_mask, float("-inf")).softmax(dim=1, dtype=torch.float32)  # (B, T)

    def forward(self, frames: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        weights = self.weights(frames, pad_mask)  # (B, T)
        return (weights.to(frames.dtype).unsqueeze(1) @ frames).squeeze(1)  # (B, 1, T) @ (B, T, D) -> (B, D)


class AttentiveStatsPooling(AttentivePooling):
    """Attentive statistics pooling (Okabe et al. 2018): the attention-weighted mean and standard
    deviation of the valid frames, concatenated (B, 2D). The deviation carries how a voice varies, which
    a mean alone averages away."""

    @staticmethod
    def out_dim(dim: int) -> int:
        return 2 * dim

    def forward(self, frames: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        weights = self.weights(frames, pad_mask).unsqueeze(-1)  # (B, T, 1) fp32
        x = frames.float().masked_fill(pad_mask.unsqueeze(-1), 0.0)  # (B, T, D): no inf * 0 at padding
        mean = (weights * x).sum(dim=1)  # (B, D)
        variance = (weights * x * x).sum(dim=1) - mean * mean
        std = variance.clamp(min=1e-6).sqrt()  # the clamp keeps the gradient finite for constant frames
        return torch.cat([mean, std], dim=1).to(frames.dtype)  # (B, 2D)
