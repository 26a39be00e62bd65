"""ModelConfig: the model section of an experiment config, its four recipe presets, and validation.

The input width (n_mels) and the number of classes (n_speakers) are deliberately not fields: they
are properties of the data and come from the shard index, so a config cannot disagree with its shards.
"""

import math
from dataclasses import dataclass, replace

POOLINGS = ("mean", "attention")
HEADS = ("linear", "am_softmax")


@dataclass
class ModelConfig:
    """Which model to build and how big; every recipe YAML spells out all fields."""

    name: str = "sample"
    """Recipe; fixes the encoder: "sample" | "medium" (Transformer) or "strong" | "boss" (Conformer)."""
    d_model: int = 80
    """Width of every frame vector after the input projection, and of the speaker embedding."""
    n_heads: int = 2
    """Attention heads per encoder layer; must divide d_model."""
    n_layers: int = 1
    """Number of encoder layers."""
    ffn_dim: int = 256
    """Hidden width of each layer's feed-forward block."""
    dropout: float = 0.1
    """Dropout probability inside the encoder layers, in [0, 1)."""
    kernel_size: int = 31
    """Conformer depthwise-convolution kernel in frames; odd to keep frames aligned. Unused by Transformer."""
    pooling: str = "mean"
    """Frames -> one vector: "mean" or "attention" (self-attentive pooling); both ignore padded frames."""
    head: str = "linear"
    """Classifier: "linear" (Linear-ReLU-Linear) or "am_softmax" (additive-margin cosine head)."""
    margin: float = 0.2
    """AM-softmax margin m, subtracted from the target cosine in training only; in [0, 1)."""
    scale: float = 30.0
    """AM-softmax scale s multiplying every cosine; > 0. Unused by the linear head, like margin."""

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A fresh copy of one recipe's defaults (a copy, so callers may edit it freely)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {MODEL_NAMES}")
        return replace(PRESETS[name])

    def validate(self) -> None:
        """Raise ValueError with a one-line message naming the first bad field."""
        _require(self.name in MODEL_NAMES, f"name must be one of {MODEL_NAMES}, got {self.name!r}")
        _require(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        _require(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        for key in ("d_model", "n_heads", "n_layers", "ffn_dim", "kernel_size"):
            value = getattr(self, key)
            _require(_is_int(value) and value > 0, f"{key} must be a positive integer, got {value!r}")
        _require(
            self.d_model % self.n_heads == 0,
            f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        _require(self.kernel_size % 2 == 1, f"kernel_size must be odd, got {self.kernel_size}")
        _require(
            _is_real(self.dropout) and 0 <= self.dropout < 1,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        _require(
            _is_real(self.margin) and 0 <= self.margin < 1, f"margin must be in [0, 1), got {self.margin!r}"
        )
        _require(
            _is_real(self.scale) and 0 < self.scale < math.inf,
            f"scale must be positive and finite, got {self.scale!r}",
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"model.{message}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `d_model: true` in a YAML file is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


_STRONG = ModelConfig(
    name="strong", d_model=224, n_heads=4, n_layers=3, ffn_dim=256, dropout=0.2, kernel_size=31
)

PRESETS: dict[str, ModelConfig] = {
    "sample": ModelConfig(),
    "medium": ModelConfig(name="medium", d_model=120, n_heads=4, n_layers=4),
    "strong": _STRONG,
    "boss": replace(_STRONG, name="boss", pooling="attention", head="am_softmax"),
}
"""The four recipes' defaults, keyed by name. Shared objects: use ModelConfig.preset(name) to get a copy."""

MODEL_NAMES = tuple(PRESETS)
