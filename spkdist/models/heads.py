"""Heads: speaker embedding (B, D) -> logits (B, n_speakers), for a cross-entropy loss.

All take `labels`, so the model can pass them unconditionally; only the margin heads use them.
"""

import math

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


class MarginHead(nn.Module):
    """A cosine classifier with a margin on the target class: logits s * f(cos(emb, w_k)).

    The margin forces each embedding to be closer to its own speaker's weight vector than to any other,
    which makes the embeddings usable for verification by cosine scoring. It applies only in training
    with labels; otherwise the head returns plain scaled cosines. The margin in use is a buffer
    (`margin_now`, not saved) so a margin schedule can move it on the device without recompiling a
    compiled model; it starts at the full `margin`.
    """

    def __init__(self, dim: int, n_speakers: int, margin: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_speakers, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.scale = scale
        self.register_buffer("margin_now", torch.tensor(float(margin)), persistent=False)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """The target class's cosine with the margin applied; (B, 1) -> (B, 1)."""
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # Normalise and multiply in fp32 even under autocast: in bf16 a cosine is only good to ~1e-2,
        # and the scale s = 30 multiplies that error into the logits.
        with torch.autocast(emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))  # (B, N)
            if self.training and labels is not None:
                target = labels.unsqueeze(1)  # (B, 1)
                cos = cos.scatter(1, target, self.target_logit(cos.gather(1, target)))  # (B, N)
        return self.scale * cos  # (B, N) fp32

    def extra_repr(self) -> str:
        n_speakers, dim = self.weight.shape
        return f"dim={dim}, n_speakers={n_speakers}, margin={self.margin}, scale={self.scale}"


class AMSoftmaxHead(MarginHead):
    """Additive-margin softmax (Wang et al. 2018): m is taken off the target cosine, cos - m."""

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.margin_now


class AAMSoftmaxHead(MarginHead):
    """Additive angular margin softmax (ArcFace, Deng et al. 2019): m is added to the target angle,
    cos(theta + m). Past theta = pi - m, where cos(theta + m) would rise again, it continues as the
    linear cos - m sin(m) (the usual `easy_margin=False` form), so the logit keeps falling with theta."""

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin_now
        sin = (1.0 - cos * cos).clamp(min=1e-7).sqrt()  # not 0: sqrt's gradient there is infinite
        shifted = cos * torch.cos(m) - sin * torch.sin(m)  # cos(theta + m)
        return torch.where(cos > torch.cos(math.pi - m), shifted, cos - m * torch.sin(m))
