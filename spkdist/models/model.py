"""SpeakerModel: encoder -> pooling -> head, and the padding mask that every stage shares.

The three stages are separate modules so recipes can swap any of them (WeSpeaker style). All of them
take the same padding mask, built once here from the utterance lengths.
"""

import torch
from torch import nn


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True at padded frames (nn.MultiheadAttention's convention)."""
    return torch.arange(max_len, device=lengths.device) >= lengths.unsqueeze(1)  # (B, T)


def normalise(mels: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, variance: bool) -> torch.Tensor:
    """Per-utterance, per-bin mean (and variance) normalisation over the real frames; padding stays 0.

    (B, T, n_mels) zero-padded, (B, T) True = padded, (B,) -> (B, T, n_mels).
    """
    count = lengths.to(mels.dtype).view(-1, 1, 1)  # (B, 1, 1)
    mean = mels.sum(dim=1, keepdim=True) / count  # padding is 0: sums over real frames only
    centred = (mels - mean).masked_fill(mask.unsqueeze(-1), 0.0)
    if variance:
        std = (centred.pow(2).sum(dim=1, keepdim=True) / count).clamp(min=1e-10).sqrt()
        centred = centred / std
    return centred


class SpeakerModel(nn.Module):
    """Log-mel frames -> speaker logits, with the pooled speaker embedding exposed by embed().

    encoder: (mels (B, T, n_mels), pad_mask (B, T)) -> frames (B, T, D)
    pooling: (frames (B, T, D), pad_mask (B, T)) -> embedding (B, D)
    head:    (embedding (B, D), labels (B,) or None) -> logits (B, n_speakers)

    Lengths must lie in [1, T]; frames past an utterance's length are padding, and their values never
    affect its logits (in eval mode: BatchNorm in the Conformer uses batch statistics in training).
    """

    def __init__(
        self, encoder: nn.Module, pooling: nn.Module, head: nn.Module, feature_norm: str = "none"
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = head
        self.feature_norm = feature_norm  # "none", "mean" or "mean_var": see `normalise`

    def embed(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Speaker embedding (B, D): the pooled vector the classifier sees."""
        mask = padding_mask(lengths, mels.shape[1])  # (B, T)
        # Zero the padding once at the entrance: masked attention gives padded frames weight 0, but
        # 0 * inf = nan, so a non-finite fill value would otherwise poison every valid frame.
        mels = mels.masked_fill(mask.unsqueeze(-1), 0.0)  # (B, T, n_mels)
        if self.feature_norm != "none":
            mels = normalise(mels, mask, lengths, variance=self.feature_norm == "mean_var")
        frames = self.encoder(mels, mask)  # (B, T, D)
        return self.pooling(frames, mask)  # (B, D)

    def forward(
        self,
        mels: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        with_embedding: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, n_speakers), and with `with_embedding` the embedding (B, D) they came from. labels
        (B,) only matter to a margin head, and only in training mode."""
        emb = self.embed(mels, lengths)
        logits = self.head(emb, labels)
        return (logits, emb) if with_embedding else logits
