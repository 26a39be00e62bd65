"""Shared fixtures: small HW4 directories, the FSDD recordings, the FSDD demo sharded once per session, and
tiny labeled shards for the training tests."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SPLITS, make_tiny_shards, tar_samples

from spkdist.bench.synth import make_hw4_dir
from spkdist.cli import main
from spkdist.demo import FSDD_ARCHIVE
from spkdist.shard_format import load_index

# 4 speakers, 40 train + 8 test utterances of 20-80 frames: shards in well under a second.
SMALL_HW4 = {"n_speakers": 4, "n_train": 40, "n_test": 8, "frames": (20, 80), "median_frames": 40}


@pytest.fixture
def make_hw4(tmp_path) -> Callable[..., Path]:
    """A factory for small synthetic HW4 directories under tmp_path: make_hw4(**make_hw4_dir overrides)."""
    made = []

    def make(**overrides) -> Path:
        made.append(tmp_path / f"hw4-{len(made)}")
        return make_hw4_dir(made[-1], **(SMALL_HW4 | overrides))

    return make


@pytest.fixture(scope="session")
def fsdd_recordings(tmp_path_factory) -> Path:
    """The embedded FSDD archive unpacked once: a directory of {digit}_{speaker}_{take}.wav files."""
    root = tmp_path_factory.mktemp("fsdd")
    with tarfile.open(FSDD_ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return root / "recordings"


@pytest.fixture(scope="session")
def fsdd_shards(tmp_path_factory) -> Path:
    """The FSDD demo sharded once by `spkdist shard --demo --workers 2`: 2,430 train, 270 valid, 300 test."""
    out = tmp_path_factory.mktemp("fsdd-shards")
    assert main(["shard", "--demo", "--out", str(out), "--workers", "2"]) == 0
    return out


@pytest.fixture
def shard_cli() -> Callable[..., int]:
    """shard_cli(SOURCE, OUT, *options): `spkdist shard SOURCE --out OUT --workers 1 ...` in this process."""
    return lambda source, out, *options: main(
        ["shard", str(source), "--out", str(out), "--workers", "1", *options]
    )


@pytest.fixture
def read_split() -> Callable[[Path, str], list[tuple[str, np.ndarray, dict]]]:
    """read_split(OUT, split): (key, features, metadata) of every sample of a split, in shard order."""

    def read(out: Path, split: str) -> list[tuple[str, np.ndarray, dict]]:
        samples = []
        for entry in load_index(out)["splits"][split]["shards"]:
            for key, parts in tar_samples(out / entry["name"]):
                samples.append((key, np.load(io.BytesIO(parts["npy"])), json.loads(parts["json"])))
        return samples

    return read


@pytest.fixture
def cli_error(capsys) -> Callable[[], str]:
    """cli_error(): the error line the last command wrote to stderr, checked to be the only line there
    besides progress bars (so no traceback either)."""

    def read() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("shard:")]
        assert len(lines) == 1 and lines[0].startswith("spkdist: error: "), err
        return lines[0]

    return read


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """4 speakers; train in 5 shards, valid (20 utterances) in ONE: with 2 ranks, one holds no valid shard;
    and 3 held-out speakers (30 utterances in 2 shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny-shards"), {**TINY_SPLITS, "heldout": 30})


@pytest.fixture(scope="session")
def one_utterance_valid(tmp_path_factory) -> Path:
    """Like tiny_shards, but the valid split is a single utterance: fewer than the ranks; and 33 held-out
    utterances in shards of 20 and 13, which 2 ranks without workers read as 2 and 1 batches of 16."""
    return make_tiny_shards(
        tmp_path_factory.mktemp("one-utterance-valid"),
        {"train": 100, "valid": 1, "test": 12, "heldout": 33},
    )
