"""Front-ends: log-mel frames (B, T, n_mels) -> encoder frames (B, T, d_model), before the first layer.

The homework's models project each frame on its own (`nn.Linear`). The convolutional front-end first runs
two 3x3 convolutions over the (time, mel) plane, as the convolution subsampling of the Conformer paper
(Gulati et al. 2020) and of MFA-Conformer do, and as ResNet speaker models start: filters shared across
the mel axis see the same spectral shape (a formant, a harmonic pattern) wherever a voice puts it, which a
per-frame projection must learn bin by bin. It halves the mel axis twice, once or not at all
(`mel_strides`) and keeps every frame (stride 1 in time), so the padding mask and the utterance lengths
are the same before and after it.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvFrontend(nn.Module):
    """Two Conv2d(3x3, mel stride 2 or 1)-BatchNorm-ReLU blocks (1 -> C -> C channels), Linear -> d_model.

    BatchNorm as in ResNet stems: without it this front-end learned far slower (valid accuracy 0.28 and
    0.44 at step 750 of 3,000, two seeds, against 0.62 and 0.58 for the per-frame Linear), its output
    six times smaller than the Linear's at initialisation.

    Padding-invariant in eval mode: the frames past an utterance's end are zeroed before each
    convolution, so a 3x3 kernel at an utterance's last frame reads the same zeros as it pads a lone
    utterance with, whatever the caller left in the padding; BatchNorm then applies
    running statistics, per element. In training its batch statistics include padded frames, as the
    Conformer's own BatchNorm does (see conformer.py).
    """

    def __init__(self, n_mels: int, d_model: int, channels: int, mel_strides: tuple[int, int] = (2, 2)):
        super().__init__()
        first, second = mel_strides
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=(1, first), padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=(1, second), padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        bins = -(-n_mels // first)  # a 3x3 convolution with padding 1 and stride s leaves ceil(n / s) bins
        bins = -(-bins // second)
        self.proj = nn.Linear(channels * bins, d_model)

    def forward(self, mels: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels), (B, T) True = padded -> (B, T, d_model)."""
        padded = pad_mask[:, None, :, None]  # (B, 1, T, 1)
        x = mels.unsqueeze(1).masked_fill(padded, 0.0)  # (B, 1, T, n_mels)
        x = F.relu(self.norm1(self.conv1(x)))  # (B, C, T, ceil(n_mels / first stride))
        x = F.relu(self.norm2(self.conv2(x.masked_fill(padded, 0.0))))  # (B, C, T, F)
        # The projection is per frame, so what the padded frames hold after it cannot reach a real one.
        return self.proj(x.transpose(1, 2).flatten(2))  # (B, T, C * F) -> (B, T, d_model)


class LinearFrontend(nn.Linear):
    """The homework's per-frame projection, nn.Linear(n_mels, d_model), taking the mask like every
    front-end (its state_dict is a plain Linear's, so checkpoints of either kind of model load)."""

    def forward(self, mels: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(mels)  # (B, T, d_model)
