"""A deterministic synthetic HW4 directory: the real set's layout, counts and shapes, random log-mel values.

Used by `spkdist bench shard`, the loader benchmark and the tests. Utterance lengths follow a lognormal
clipped to `frames` (the real set: a few hundred frames on average, ~7 GB of float32 in all); values are
log-mel-like (mean -6, spread 3) with a leading stretch of silence at the -20 floor that the HW4 sample
code also pads with. The same arguments always give the same files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from ..shard_run import ShardOptions, shard
from ..sources import read_hw4

HW4_SPEAKERS, HW4_TRAIN, HW4_TEST, HW4_N_MELS = 600, 56_666, 8_000, 40
SILENCE = -20.0


def make_hw4_dir(
    out: Path,
    *,
    n_speakers: int = HW4_SPEAKERS,
    n_train: int = HW4_TRAIN,
    n_test: int = HW4_TEST,
    n_mels: int = HW4_N_MELS,
    scale: float = 1.0,
    frames: tuple[int, int] = (100, 2000),
    median_frames: int = 500,
    seed: int = 0,
) -> Path:
    """Write mapping.json, metadata.json, testdata.json and uttr-*.pt into `out` (created); return `out`.

    `scale` multiplies both utterance counts; every speaker keeps at least one training utterance.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    speakers = [f"id{10001 + i}" for i in range(n_speakers)]
    n_train = max(n_speakers, round(n_train * scale))
    n_test = round(n_test * scale)
    # Each speaker gets one utterance; the rest are spread unevenly, as in the real set.
    owners = np.concatenate([np.arange(n_speakers), rng.integers(0, n_speakers, n_train - n_speakers)])
    lengths = np.clip(rng.lognormal(np.log(median_frames), 0.6, n_train + n_test), *frames).astype(int)
    entries = []
    for length in lengths:
        name = f"uttr-{rng.bytes(16).hex()}.pt"
        values = rng.standard_normal((length, n_mels), dtype=np.float32) * 3 - 6  # (mel_len, n_mels)
        values[: rng.integers(0, length // 10 + 1)] = SILENCE
        torch.save(torch.from_numpy(values), out / name)
        entries.append({"feature_path": name, "mel_len": int(length)})
    metadata = {name: [] for name in speakers}
    for owner, entry in zip(owners, entries[:n_train], strict=True):
        metadata[speakers[owner]].append(entry)
    speaker2id = {name: i for i, name in enumerate(speakers)}
    id2speaker = {str(i): name for i, name in enumerate(speakers)}  # string keys, as in the real file
    _write_json(out / "mapping.json", {"speaker2id": speaker2id, "id2speaker": id2speaker})
    _write_json(out / "metadata.json", {"n_mels": n_mels, "speakers": metadata})
    _write_json(out / "testdata.json", {"n_mels": n_mels, "utterances": entries[n_train:]})
    return out


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2))


def make_hw4_shards(
    work: Path, *, scale: float, seed: int, workers: int, shard_mb: float
) -> tuple[Path, Path]:
    """A synthetic HW4 directory (WORK/hw4) and its shards (WORK/shards), as `spkdist shard HW4DIR --out
    DIR` writes them; prints how long each took."""
    started = time.perf_counter()
    hw4 = make_hw4_dir(work / "hw4", scale=scale, seed=seed)
    generated = time.perf_counter()
    bad = BadInput(skip=False)
    corpus = read_hw4(hw4, bad)
    options = ShardOptions(workers=workers, seed=seed, max_shard_mb=shard_mb, progress=False)
    summary = shard(corpus, corpus.precomputed, work / "shards", options, bad)
    print(f"generated {hw4} in {generated - started:.1f} s; sharded in {summary.seconds:.1f} s:\n{summary}")
    return hw4, work / "shards"
