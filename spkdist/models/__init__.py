"""The model registry: build_model(cfg, n_mels, n_speakers) turns a ModelConfig into a SpeakerModel.

    model = build_model(load_config("boss.yaml").model, n_mels=40, n_speakers=600)
    logits = model(mels, lengths, labels)  # (B, T, n_mels), (B,), (B,) -> (B, n_speakers)
    emb = model.embed(mels, lengths)  # (B, embedding width)

Front-end, encoder, pooling and head are each picked by their own config field (WeSpeaker style: one file per
model family, pooling layers and margin heads as swappable modules).
"""

from collections.abc import Callable

from torch import nn

from spkdist.config import ModelConfig
from spkdist.models.conformer import ConformerEncoder
from spkdist.models.frontend import ConvFrontend, LinearFrontend
from spkdist.models.heads import AAMSoftmaxHead, AMSoftmaxHead, LinearHead, MarginHead
from spkdist.models.model import SpeakerModel, padding_mask
from spkdist.models.pooling import AttentivePooling, AttentiveStatsPooling, MeanPooling
from spkdist.models.transformer import TransformerEncoder

__all__ = [
    "ENCODERS",
    "FRONTENDS",
    "HEADS",
    "POOLINGS",
    "AAMSoftmaxHead",
    "AMSoftmaxHead",
    "AttentivePooling",
    "AttentiveStatsPooling",
    "ConformerEncoder",
    "ConvFrontend",
    "LinearFrontend",
    "LinearHead",
    "MarginHead",
    "MeanPooling",
    "SpeakerModel",
    "TransformerEncoder",
    "build_model",
    "padding_mask",
]

FRONTENDS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "linear": lambda cfg, n_mels: LinearFrontend(n_mels, cfg.d_model),
    "conv2d": lambda cfg, n_mels: ConvFrontend(
        n_mels, cfg.d_model, cfg.frontend_channels, cfg.frontend_mel_strides
    ),
}
# Encoders take their front-end, which maps (B, T, n_mels) to (B, T, d_model).
ENCODERS: dict[str, Callable[[ModelConfig, nn.Module], nn.Module]] = {
    "transformer": lambda cfg, prenet: TransformerEncoder(
        prenet, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_dim, cfg.dropout
    ),
    "conformer": lambda cfg, prenet: ConformerEncoder(
        prenet,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_layers,
        cfg.ffn_dim,
        cfg.kernel_size,
        cfg.dropout,
        concat_layers=cfg.layer_aggregation == "concat",
    ),
}
# Poolings take the width of the encoder's frames: d_model, or n_layers x d_model with layer_aggregation.
POOLINGS: dict[str, Callable[[int], nn.Module]] = {
    "mean": lambda dim: MeanPooling(),
    "attention": lambda dim: AttentivePooling(dim),
    "attentive_stats": lambda dim: AttentiveStatsPooling(dim),
}
# Heads take the embedding width, which the pooling decides (attentive statistics: twice the frames').
HEADS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "linear": lambda cfg, dim, n_speakers: LinearHead(dim, n_speakers),
    "am_softmax": lambda cfg, dim, n_speakers: AMSoftmaxHead(dim, n_speakers, cfg.margin, cfg.scale),
    "aam_softmax": lambda cfg, dim, n_speakers: AAMSoftmaxHead(dim, n_speakers, cfg.margin, cfg.scale),
}


def build_model(cfg: ModelConfig, n_mels: int, n_speakers: int) -> SpeakerModel:
    """The model `cfg` describes (validated when its config was loaded); n_mels and n_speakers come from
    the shard index."""
    if n_mels < 1 or n_speakers < 1:
        raise ValueError(
            f"n_mels and n_speakers must be positive, got n_mels={n_mels}, n_speakers={n_speakers}"
        )
    encoder = ENCODERS[cfg.encoder](cfg, FRONTENDS[cfg.frontend](cfg, n_mels))
    pooling = POOLINGS[cfg.pooling](encoder.out_dim)
    head = HEADS[cfg.head](cfg, pooling.out_dim(encoder.out_dim), n_speakers)
    return SpeakerModel(encoder, pooling, head, cfg.feature_norm)
