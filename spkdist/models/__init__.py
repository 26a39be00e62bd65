"""The model registry: build_model(cfg, n_mels, n_speakers) turns a ModelConfig into a SpeakerModel.

    model = build_model(ModelConfig.preset("boss"), n_mels=40, n_speakers=600)
    logits = model(mels, lengths, labels)  # (B, T, n_mels), (B,), (B,) -> (B, n_speakers)
    emb = model.embed(mels, lengths)  # (B, d_model)

The recipe name picks the encoder family; pooling and head are picked by their own fields.
"""

from collections.abc import Callable

from torch import nn

from spkdist.models.config import HEADS, MODEL_NAMES, POOLINGS, PRESETS, ModelConfig
from spkdist.models.conformer import ConformerEncoder
from spkdist.models.heads import AMSoftmaxHead, LinearHead
from spkdist.models.model import SpeakerModel, padding_mask
from spkdist.models.pooling import AttentivePooling, MeanPooling
from spkdist.models.transformer import TransformerEncoder

__all__ = [
    "ENCODERS",
    "HEADS",
    "MODEL_NAMES",
    "POOLINGS",
    "PRESETS",
    "AMSoftmaxHead",
    "AttentivePooling",
    "ConformerEncoder",
    "LinearHead",
    "MeanPooling",
    "ModelConfig",
    "SpeakerModel",
    "TransformerEncoder",
    "build_model",
    "padding_mask",
]


def _transformer(cfg: ModelConfig, n_mels: int) -> nn.Module:
    return TransformerEncoder(n_mels, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_dim, cfg.dropout)


def _conformer(cfg: ModelConfig, n_mels: int) -> nn.Module:
    return ConformerEncoder(
        n_mels, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_dim, cfg.kernel_size, cfg.dropout
    )


ENCODERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "sample": _transformer,
    "medium": _transformer,
    "strong": _conformer,
    "boss": _conformer,
}


def build_model(cfg: ModelConfig, n_mels: int, n_speakers: int) -> SpeakerModel:
    """Validate cfg and build its model; n_mels and n_speakers come from the shard index."""
    cfg.validate()
    if n_mels < 1 or n_speakers < 1:
        raise ValueError(
            f"n_mels and n_speakers must be positive, got n_mels={n_mels}, n_speakers={n_speakers}"
        )
    encoder = ENCODERS[cfg.name](cfg, n_mels)
    pooling = AttentivePooling(cfg.d_model) if cfg.pooling == "attention" else MeanPooling()
    if cfg.head == "am_softmax":
        head = AMSoftmaxHead(cfg.d_model, n_speakers, cfg.margin, cfg.scale)
    else:
        head = LinearHead(cfg.d_model, n_speakers)
    return SpeakerModel(encoder, pooling, head)
