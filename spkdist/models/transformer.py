"""The Transformer encoder of the "sample" and "medium" recipes (the HW4 baseline, batch-first)."""

import torch
from torch import nn


class TransformerEncoder(nn.Module):
    """A front-end (n_mels -> d_model), then n_layers post-norm nn.TransformerEncoderLayers."""

    def __init__(
        self, prenet: nn.Module, d_model: int, n_heads: int, n_layers: int, ffn_dim: int, dropout: float
    ):
        super().__init__()
        self.out_dim = d_model  # the width of forward's frames
        self.prenet = prenet  # (B, T, n_mels), (B, T) -> (B, T, d_model): see frontend.py
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ffn_dim, dropout, batch_first=True)
        # no nested tensors: they break under DeepSpeed ZeRO-3's parameter hooks and save little here
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, mels: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels), (B, T) True = padded -> (B, T, d_model)."""
        x = self.prenet(mels, pad_mask)  # (B, T, D)
        # Every other operation is per-frame, so the key mask alone keeps padding out of valid frames.
        if not self.training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # That fast path checks only for CUDA autocast (pytorch#132613): under CPU autocast it
            # feeds bf16 activations to fp32 weights and fails. Evaluate the layers in fp32 there;
            # CUDA autocast is handled by the fast path itself.
            with torch.autocast(x.device.type, enabled=False):
                return self.layers(x.float(), src_key_padding_mask=pad_mask)  # (B, T, D)
        return self.layers(x, src_key_padding_mask=pad_mask)  # (B, T, D)
