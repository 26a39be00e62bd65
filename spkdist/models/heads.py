"""Heads: speaker embedding (B, D) -> logits (B, n_speakers), for a cross-entropy loss.

Both take `labels`, so the model can pass them unconditionally; only a margin head uses them.
"""

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Linear-ReLU-Linear classifier, as in the HW4 reference."""

    def __init__(self, dim: int, n_speakers: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, n_speakers))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(emb)  # (B, n_speakers)


class AMSoftmaxHead(nn.Module):
    """Additive-margin softmax (Wang et al. 2018): logits s * cos(emb, w_k), with m taken off the target.

    The margin forces each embedding to be closer to its own speaker's weight vector than to any other
    by m in cosine, which makes the embeddings usable for verification by cosine scoring. It applies
    only in training with labels; otherwise the head returns plain scaled cosines.
    """

    def __init__(self, dim: int, n_speakers: int, margin: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_speakers, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.scale = scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # Normalise and multiply in fp32 even under autocast: in bf16 a cosine is only good to ~1e-2,
        # and the scale s = 30 multiplies that error into the logits.
        with torch.autocast(emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))  # (B, N)
        if self.training and labels is not None:
            target = labels.unsqueeze(1)  # (B, 1)
            cos = cos.scatter(1, target, cos.gather(1, target) - self.margin)  # (B, N)
        return self.scale * cos  # (B, N) fp32

    def extra_repr(self) -> str:
        n_speakers, dim = self.weight.shape
        return f"dim={dim}, n_speakers={n_speakers}, margin={self.margin}, scale={self.scale}"
