"""The Conformer encoder of the "strong" and "boss" recipes: torchaudio's Conformer, made padding-invariant.

torchaudio's Conformer lets padding leak into valid frames. Each layer's convolution module runs a
depthwise Conv1d over time, and near an utterance's end its kernel reads the padded frames, which are
nonzero by then (the feed-forward and attention sublayers before it add biases to every frame). So the
last kernel_size // 2 valid frames, and through later layers ever more of them, depend on how long the
other utterances in the batch were. We zero the padded frames right before every depthwise
convolution: the convolution then sees exactly the zeros it pads a lone utterance with.

BatchNorm in the same module is per-frame in eval mode (running statistics), so it keeps invariance
there; in training it normalises with batch statistics, padded frames included, as torchaudio does.
"""

import torch
import torchaudio
from torch import nn


class ConformerEncoder(nn.Module):
    """A front-end (n_mels -> d_model), then torchaudio.models.Conformer with padding zeroed before its convs.

    With concat_layers the output is every layer's frames side by side (MFA-Conformer's multi-scale
    feature aggregation): each torchaudio layer ends in its own LayerNorm, so the parts arrive on one
    scale and need no further norm, and the state_dict stays torchaudio's either way.
    """

    def __init__(
        self,
        prenet: nn.Module,
        d_model: int,
        n_heads: int,
        n_layers: int,
        ffn_dim: int,
        kernel_size: int,
        dropout: float,
        concat_layers: bool = False,
    ):
        super().__init__()
        self.concat_layers = concat_layers
        self.out_dim = d_model * n_layers if concat_layers else d_model  # the width of forward's frames
        self.prenet = prenet  # (B, T, n_mels), (B, T) -> (B, T, d_model): see frontend.py
        self.conformer = torchaudio.models.Conformer(
            input_dim=d_model,
            num_heads=n_heads,
            ffn_dim=ffn_dim,
            num_layers=n_layers,
            depthwise_conv_kernel_size=kernel_size,
            dropout=dropout,
        )
        # A hook rather than a wrapper module keeps the state_dict identical to torchaudio's Conformer.
        # It needs this batch's mask, which forward() holds in _conv_mask while the layers run.
        self._conv_mask: torch.Tensor | None = None
        for layer in self.conformer.conformer_layers:
            depthwise = next(
                m for m in layer.conv_module.sequential if isinstance(m, nn.Conv1d) and m.groups > 1
            )
            depthwise.register_forward_pre_hook(self._zero_padding)

    def _zero_padding(self, conv: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (x,) = args  # (B, D, T): the convolution module runs channels-first
        if self._conv_mask is None:
            # Loud rather than silently unmasked, e.g. under activation checkpointing's recomputation.
            raise RuntimeError("ConformerEncoder's layers must run inside ConformerEncoder.forward")
        return (x.masked_fill(self._conv_mask, 0.0),)

    def forward(self, mels: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels), (B, T) True = padded -> (B, T, out_dim)."""
        # Run the layers directly, not Conformer.forward: it rebuilds the mask from lengths.max(), a
        # host-device sync, and its mask would be narrower than T when the batch is padded beyond
        # its longest utterance.
        x = self.prenet(mels, pad_mask).transpose(0, 1)  # (T, B, D): torchaudio's layers are time-first
        self._conv_mask = pad_mask.unsqueeze(1)  # (B, 1, T)
        outputs = []  # every layer's frames, kept only for concat_layers (long utterances: memory)
        try:
            for layer in self.conformer.conformer_layers:
                x = layer(x, pad_mask)  # (T, B, D)
                if self.concat_layers:
                    outputs.append(x)
        finally:
            self._conv_mask = None
        if self.concat_layers:
            x = torch.cat(outputs, dim=-1)  # (T, B, n_layers * D)
        return x.transpose(0, 1)  # (B, T, out_dim)
