"""Experiment configuration: typed dataclasses, loaded from YAML, overridden by `section.key=value`.

A config file has one mapping per section (data, model, optim, train, log); every key must name a field
below. Loading checks types (from the annotations, `Literal` choices included) and ranges (each section's
`validate`), and rejects unknown sections and keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from .errors import SpkdistError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

RECIPES = ("sample", "medium", "strong", "boss")
"""The homework's recipe ladder. Each is the file configs/<name>.yaml, the only place a recipe is defined."""

CONFIG_VERSION = 2
"""Layout version of the config stored in checkpoints; `migrate_config` reads the older ones."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (true/false only): in YAML 1.1 `no`, `off` and `y` are booleans, so
    `train.mixed_precision=no` would arrive as False instead of the choice "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


# The shipped configs (recipes, Accelerate launch configs): package data, so a regular install has them.
# Bare names (`--config boss.yaml`) are looked up here when the working directory has no such file.
# (The clone's top-level configs/ is a link to this directory.)
CONFIG_DIR = importlib.resources.files("spkdist") / "configs"


@dataclass
class DataConfig:
    shards: str = "shards/fsdd-demo"
    """Shard directory written by `spkdist shard` (or a webdataset URL prefix holding index.json)."""
    segment_len: int = 128
    """Training crop length in frames; shorter utterances are kept whole."""
    batch_size: int = 32
    """Utterances per batch on each process (the global batch is batch_size x processes x grad_accum)."""
    eval_batch_size: int = 64
    """Utterances per evaluation batch (whole utterances, bucketed by length)."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    shuffle_buffer: int = 2000
    """Samples held in the training shuffle buffer of each worker."""
    on_bad_shard: Literal["warn", "raise"] = "warn"
    """A corrupt training shard: skip it with a warning and count it, or stop the run."""
    time_masks: int = 0
    """SpecAugment: time masks per training crop (each a run of frames set to the crop's mean); 0: off."""
    time_mask_width: int = 0
    """SpecAugment: the longest time mask, in frames (each width is drawn in [0, this])."""
    freq_masks: int = 0
    """SpecAugment: frequency masks per training crop (bands of mel bins); 0: off. Never at evaluation."""
    freq_mask_width: int = 0
    """SpecAugment: the widest frequency mask, in mel bins."""
    noise_prob: float = 0.0
    """Share of training crops that get additive noise in the mel-energy domain, shaped like the crop's
    own noise floor (before the SpecAugment masks, never at evaluation); in [0, 1]; 0: off."""
    noise_snr: tuple[float, float] = (5.0, 20.0)
    """[low, high]: each noisy crop's signal-to-noise ratio in dB is drawn uniformly in this range."""

    def validate(self) -> None:
        _positive(self, "segment_len", "batch_size", "eval_batch_size", "shuffle_buffer")
        for name in ("num_workers", "time_masks", "time_mask_width", "freq_masks", "freq_mask_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"data.noise_prob must be in [0, 1], got {self.noise_prob}")
        low, high = self.noise_snr
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(
                f"data.noise_snr must be [low, high] dB with low <= high, got {list(self.noise_snr)}"
            )


@dataclass
class ModelConfig:
    """Which model to build and how big. The recipes are configs/{sample,medium,strong,boss}.yaml, which
    spell out their sizes and stages; these defaults are the fallback for a field a file leaves out.

    The input width (n_mels) and the number of classes (n_speakers) are deliberately not fields: they are
    properties of the data and come from the shard index, so a config cannot disagree with its shards.
    """

    name: str = "sample"
    """The recipe's name: a label for logs and checkpoints. It selects nothing; the fields below do."""
    frontend: Literal["linear", "conv2d"] = "linear"
    """How each log-mel frame becomes a d_model-wide vector before the first encoder layer: the homework's
    per-frame Linear, or two 3x3 convolutions over time and mel bins (stride 2 or 1 over the bins,
    frontend_mel_strides; every frame kept) and then a Linear: filters shared across the mel axis, as
    the Conformer paper's convolution subsampling and ResNet speaker models start."""
    frontend_channels: int = 32
    """Channels of both convolutions of the conv2d front-end; unused by the linear one."""
    frontend_mel_strides: tuple[int, int] = (2, 2)
    """Stride over the mel bins of the conv2d front-end's first and second convolution, each 1 or 2: (2, 2)
    leaves a quarter of the bins, (1, 2) half of them, (1, 1) all (finer frequency detail, such as where a
    voice's harmonics fall, for a wider projection and more convolution work)."""
    encoder: Literal["transformer", "conformer"] = "transformer"
    """Frame encoder: post-norm Transformer layers (sample, medium) or torchaudio's Conformer."""
    d_model: int = 80
    """Width of every frame vector after the input projection; the speaker embedding is as wide as the
    frames the pooling sees (see layer_aggregation), twice that with attentive statistics."""
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
    feature_norm: Literal["none", "mean", "mean_var"] = "none"
    """Per-utterance normalisation of the log-mels inside the model, over its real frames (the crop in
    training, the whole utterance at evaluation): subtract each bin's mean (cepstral mean normalisation),
    and with mean_var also divide by its standard deviation. Part of the model, so every use of a
    checkpoint (evaluate, predict, export) applies it the same way."""
    layer_aggregation: Literal["last", "concat"] = "last"
    """What a Conformer hands the pooling: its last layer's frames (width d_model), or every layer's frames
    side by side (width n_layers x d_model; the multi-scale feature aggregation of MFA-Conformer, Zhang et
    al. 2022), so the pooling also sees the lower layers' finer acoustic detail. Conformer only."""
    pooling: Literal["mean", "attention", "attentive_stats"] = "mean"
    """Frames -> one vector, all ignoring padded frames: masked mean, self-attentive pooling, or attentive
    statistics (attention-weighted mean and standard deviation: an embedding twice the frames' width)."""
    head: Literal["linear", "am_softmax", "aam_softmax"] = "linear"
    """Classifier: Linear-ReLU-Linear, or a cosine head with an additive margin on the target: AM-softmax
    (cos - m) or AAM-softmax (ArcFace: cos(theta + m))."""
    margin: float = 0.2
    """Margin m of the margin heads (a cosine for AM, an angle in radians for AAM), in training only;
    in [0, 1)."""
    scale: float = 30.0
    """Scale s multiplying every cosine of a margin head; > 0. Unused by the linear head, like margin."""

    def validate(self) -> None:
        _positive(
            self, "d_model", "n_heads", "n_layers", "ffn_dim", "kernel_size", "frontend_channels", "scale"
        )
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be odd, got {self.kernel_size}")
        for name in ("dropout", "margin"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not math.isfinite(self.scale):
            raise ValueError(f"model.scale must be finite, got {self.scale}")
        if not all(stride in (1, 2) for stride in self.frontend_mel_strides):
            raise ValueError(
                f"model.frontend_mel_strides must be 1 or 2 each, got {list(self.frontend_mel_strides)}"
            )
        if self.layer_aggregation == "concat" and self.encoder != "conformer":
            raise ValueError(
                f"model.layer_aggregation=concat needs model.encoder=conformer, got {self.encoder}"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached at the end of warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients."""
    warmup_steps: int | None = 1000
    """Optimizer steps of linear warmup from 0 to `lr`; then cosine decay to 0 at train.max_steps. Set
    exactly one of warmup_steps and warmup_fraction (the other null); a command-line override of one of
    them nulls the other."""
    warmup_fraction: float | None = None
    """Warmup as a share of train.max_steps, in [0, 1): it follows the run's length (0.1 of a 3,000-step
    run is 300 steps; the 1,000 steps sized for 70,000 would be a third of it)."""

    def warmup(self, max_steps: int) -> int:
        """Warmup steps for a run of `max_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * max_steps)

    def validate(self) -> None:
        _positive(self, "lr")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if (self.warmup_steps is None) == (self.warmup_fraction is None):
            raise ValueError(
                "set exactly one of optim.warmup_steps and optim.warmup_fraction (the other null)"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")


@dataclass
class TrainConfig:
    max_steps: int = 70_000
    """Optimizer steps of the whole run (a resumed run continues to the same count)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float = 5.0
    """Gradient clipping by global L2 norm; 0 disables it."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Autocast precision; null takes the launcher's setting (`accelerate launch --mixed_precision`)."""
    seed: int = 0
    """Seed of model init and data order (each rank and worker derives its own)."""
    eval_every: int = 2000
    """Evaluate on the validation split every this many steps (and at the end)."""
    save_every: int = 2000
    """Write a checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Step checkpoints kept (the newest ones); `best` is kept as well."""
    log_every: int = 50
    """Log training metrics every this many steps."""
    output_dir: str = "runs/boss"
    """Run directory: checkpoints/, the tracker's files, the resolved config."""
    resume: str | None = None
    """null: start fresh; `latest`: the newest checkpoint in output_dir (fresh if none); or a path."""
    max_nonfinite: int = 10
    """Consecutive steps with a non-finite loss or gradient norm that stop the run."""
    eval_split: str = "valid"
    """Shard split evaluated during training."""
    collective_timeout: int = 600
    """Seconds a rank waits in a collective (joining included) for the others before the job fails."""
    margin_warmup: tuple[int, int] | None = None
    """Steps [start, end] over which a margin head's margin grows linearly from 0 to model.margin
    (WeSpeaker's margin scheduler; logged as train/am_margin); null: the full margin from the start."""
    compile: bool = False
    """Compile the model with torch.compile (not under DeepSpeed). Off until measured faster on your GPU."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    """torch.compile mode, when train.compile is on."""
    eval_verification: bool = False
    """At each evaluation also embed the shards' `heldout` split (speakers never trained on; made by
    `spkdist shard --heldout-speakers`) and log valid/eer and valid/min_dcf (P_target 0.01) of cosine
    scores on a fixed, seeded trial list."""
    verification_trials: int = 2000
    """Target trials and as many non-target trials in that list (train.seed seeds it)."""

    def validate(self) -> None:
        _positive(self, "max_steps", "grad_accum", "eval_every", "save_every", "keep_last", "log_every")
        _positive(self, "max_nonfinite", "collective_timeout", "verification_trials")
        if self.clip_grad_norm < 0:
            raise ValueError(f"train.clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        if self.margin_warmup is not None and not 0 <= self.margin_warmup[0] < self.margin_warmup[1]:
            raise ValueError(
                f"train.margin_warmup must be [start, end] with 0 <= start < end, got {self.margin_warmup}"
            )


@dataclass
class LogConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    """Where metrics go, through Accelerate's trackers."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline never needs the network (upload later with `wandb sync`); online needs a W&B login."""
    project: str = "spkdist"
    """Tracker project name."""
    run_name: str | None = None
    """Tracker run name; null uses the output directory's name."""

    def validate(self) -> None:
        """Every field is a checked choice or a free string: nothing more to check."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML, trackers and checkpoints."""
        return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(self))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ValueError(f"{_section_name(section)}.{name} must be > 0, got {value}")


def _section_name(section: Any) -> str:
    return type(section).__name__.removesuffix("Config").lower()


def resolve_config_path(name: str | Path) -> Path | Traversable:
    """The config file for `name`: as given if it exists; a bare name (`boss.yaml`, `.yaml` optional) is
    also looked for in ./configs/ (where `spkdist configs --copy .` puts editable copies), then among
    the shipped configs. A path with a directory is never replaced by a shipped file of the same name."""
    path = Path(name)
    if path.is_file():
        return path
    if path.name == str(name):
        for folder in (Path("configs"), CONFIG_DIR):
            for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
                if candidate.is_file():
                    return candidate
    raise SpkdistError(
        f"{name}: config file not found (a bare name is also looked for in ./configs and {CONFIG_DIR})"
    )


WARMUP_FIELDS = ("warmup_steps", "warmup_fraction")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, check and return it."""
    path = resolve_config_path(path)
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpkdistError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpkdistError(f"{path}: expected a mapping of sections (data, model, optim, train, log)")
    overridden = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            raise SpkdistError(f"override '{item}': expected section.key=value, e.g. train.max_steps=300")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise SpkdistError(f"{path}: section '{section}' must be a mapping")
        raw[section][name] = _parse_override_value(value)
        overridden.add((section, name))
    # The warm-up is given one way: an override of either form replaces the file's, whichever it used.
    warmup = [name for name in WARMUP_FIELDS if ("optim", name) in overridden]
    if len(warmup) == 1:
        (other,) = set(WARMUP_FIELDS) - set(warmup)
        raw["optim"][other] = None
    model = raw.get("model")
    if isinstance(model, dict) and "encoder" not in model and model.get("name") in ("strong", "boss"):
        # before `model.encoder` existed the recipe name chose it: such a file would now silently build
        # a Transformer
        raise SpkdistError(
            f"{path}: model.encoder is missing; add `encoder: conformer` (the recipe name no longer picks it)"
        )
    return config_from_dict(raw, where=str(path))


def _parse_override_value(text: str) -> Any:
    """A command-line value as YAML would read it, plus `3e-4` as a float (YAML 1.1 wants `3.0e-4`)."""
    value = _load_yaml(text) if text else None
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)
    return value


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Build and validate a Config from a nested dict (a YAML file, or the copy inside a checkpoint)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise SpkdistError(
                f"{where}: unknown section '{section}' (expected one of {', '.join(sections)})"
            )
        if not isinstance(values, dict):
            raise SpkdistError(f"{where}: section '{section}' must be a mapping")
        built[section] = _build_section(sections[section].default_factory, section, values, where)
    config = Config(**built)
    for section in sections:
        try:
            getattr(config, section).validate()
        except ValueError as e:
            raise SpkdistError(f"{where}: {e}") from None
    return config


def _build_section(cls: type, section: str, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise SpkdistError(f"{where}: unknown key '{section}.{key}' (known: {', '.join(sorted(known))})")
        try:
            checked[key] = _coerce(value, hints[key])
        except TypeError as e:
            raise SpkdistError(f"{where}: {section}.{key}: {e}") from None
    return cls(**checked)


def _coerce(value: Any, hint: Any) -> Any:
    """`value` checked against the annotation `hint`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(" or ".join(errors))
    if hint is type(None):
        if value is not None:
            raise TypeError(f"expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            raise TypeError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"expected {hint.__name__}, got {value!r}")
    return value


def migrate_config(raw: dict[str, Any], version: int) -> dict[str, Any]:
    """A config stored by an earlier spkdist (layout `version`) as this one reads it.

    1 -> 2: `model.encoder` became a field; before it, the recipe name picked the encoder.
    """
    raw = copy.deepcopy(raw)
    if version < 2:
        model = raw.setdefault("model", {})
        conformer = model.get("name") in ("strong", "boss")
        model.setdefault("encoder", "conformer" if conformer else "transformer")
    return raw


def dump_config(config: Config) -> str:
    """The config as YAML, in the same shape as the files in configs/."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
