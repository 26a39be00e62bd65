"""Per-utterance features for the shards: log-mel from audio files, or precomputed log-mel from .pt files.

An extractor is a small frozen (picklable: it travels to the worker processes) object with `params`, the
dict recorded in index.json, and a call mapping one file to a float array of shape (frames, n_mels).
`check_features` and `cast` then make every utterance, whatever its origin, a finite (frames, n_mels)
array in the shard dtype, or a BadItemError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .errors import BadItemError, SpkdistError
from .torchfile import load_tensor

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LogMel:
    """Log-mel filterbank energies of audio, mixed down to mono and resampled to one rate."""

    sample_rate: int = 16000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 40
    n_fft: int | None = None  # None: the next power of two >= the window
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    log_floor: float = 1e-6  # energies are clamped to this before the log, so silence gives log(floor)

    def __post_init__(self):
        for name in ("sample_rate", "win_ms", "hop_ms", "n_mels", "log_floor"):
            if getattr(self, name) <= 0:
                raise SpkdistError(f"log-mel setting {name} must be positive, got {getattr(self, name)}")
        # Resolve the defaults so that `params` records the values actually used (frozen: bypass setattr).
        if self.n_fft is None:
            object.__setattr__(self, "n_fft", 1 << (self.win_length - 1).bit_length())
        if self.f_max is None:
            object.__setattr__(self, "f_max", self.sample_rate / 2)
        if self.n_fft < self.win_length:
            raise SpkdistError(
                f"log-mel n_fft {self.n_fft} is shorter than the {self.win_length}-sample window"
            )
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise SpkdistError(f"log-mel needs 0 <= f_min < f_max <= {self.sample_rate / 2:g} Hz")

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "kind": "log-mel",
            **asdict(self),
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "window": "hann",
            "power": 2.0,
            "mel_scale": "htk",
            "center": True,
            "pad_mode": "constant",
            "channels": "mean",
        }

    @cached_property
    def _mel(self) -> torchaudio.transforms.MelSpectrogram:
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            # Zero padding, unlike the default reflection, also works for clips shorter than half a window.
            pad_mode="constant",
        )

    @cached_property
    def _resamplers(self) -> dict[int, torchaudio.transforms.Resample]:
        return {}  # by source rate: a Resample transform builds its filter once, not per file

    def __call__(self, path: str) -> np.ndarray:
        samples, rate = _read_audio(path)  # (samples, channels)
        wave = torch.from_numpy(samples.mean(axis=1))  # (samples,)
        if rate != self.sample_rate:
            if rate not in self._resamplers:
                self._resamplers[rate] = torchaudio.transforms.Resample(rate, self.sample_rate)
            wave = self._resamplers[rate](wave)
        mel = self._mel(wave)  # (n_mels, frames)
        return mel.clamp(min=self.log_floor).log().T.numpy()  # (frames, n_mels)


def _read_audio(path: str) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 samples and the sample rate; BadItemError if unreadable or empty."""
    if not os.path.isfile(path):
        raise BadItemError(path, "file not found")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError) as e:
        raise BadItemError(path, f"unreadable audio ({e})") from None
    if samples.shape[0] == 0:
        raise BadItemError(path, "empty audio (0 samples)")
    return samples, rate


@dataclass(frozen=True)
class Precomputed:
    """Log-mel features computed elsewhere, one torch.save'd (frames, n_mels) tensor per file (HW4)."""

    n_mels: int

    @property
    def params(self) -> dict[str, Any]:
        return {"kind": "precomputed", "n_mels": self.n_mels, "files": "torch.save tensors (frames, n_mels)"}

    def __call__(self, path: str) -> np.ndarray:
        return load_tensor(path)  # (frames, n_mels) if the file is what it should be; checked next


def check_features(
    feats: np.ndarray, path: str, n_mels: int, expected_frames: int | None, dtype: str
) -> None:
    """Raise BadItemError unless `feats` is a finite (frames >= 1, n_mels) array whose values fit `dtype`.

    `expected_frames` is what the input's metadata claims (HW4 mel_len), or None.
    """
    if feats.ndim != 2 or feats.shape[1] != n_mels:
        raise BadItemError(path, f"features have shape {tuple(feats.shape)}, expected (frames, {n_mels})")
    if feats.shape[0] == 0:
        raise BadItemError(path, "zero-length utterance (0 frames)")
    if expected_frames is not None and feats.shape[0] != expected_frames:
        raise BadItemError(path, f"{feats.shape[0]} frames, but the metadata says {expected_frames}")
    # min and max propagate NaN and inf, so two cheap reductions check finiteness and the range together.
    limit = float(torch.finfo(DTYPES[dtype]).max)
    if not (-limit <= feats.min() and feats.max() <= limit):
        if not np.isfinite(feats).all():
            raise BadItemError(path, "features contain NaN or inf values")
        raise BadItemError(
            path, f"feature values exceed the {dtype} range (+-{limit:g}); store them as float32"
        )


def cast(feats: np.ndarray, dtype: str) -> np.ndarray:
    """`feats` as a C-contiguous `dtype` array (torch casts float32 to float16 ~10x faster than numpy)."""
    return torch.from_numpy(feats).to(DTYPES[dtype], memory_format=torch.contiguous_format).numpy()
