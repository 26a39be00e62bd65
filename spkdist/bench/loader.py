"""Training-loader throughput: our shard stream against the homework's one-file-per-utterance loader.

Generates a synthetic HW4-shaped directory (`make_hw4_dir`, as `spkdist bench shard` does) and shards it
with the code `spkdist shard` runs, then times two loaders in this one run, with the same batch size,
crop length and worker count:

    baseline  the reference homework approach: a map-style Dataset doing one `torch.load` per utterance
              file, a random crop, `pad_sequence` collate, DataLoader(shuffle=True, drop_last=True)
    ours      `spkdist.stream.train_loader` over the shards (shuffle buffer as in the training config)

Each loader first yields --warmup batches (worker start-up, shuffle-buffer fill), then --batches batches
are timed; every batch is full, so samples/s = batches x batch size / seconds. Warm: every file is read
once beforehand, so both run from the page cache. --cold adds runs after dropping the page cache (root
only: `sync; echo 1 > /proc/sys/vm/drop_caches`) before each loader starts, and reports the data read
from disk meanwhile (system-wide /proc/vmstat pgpgin). Goals: ours/baseline >= 3 warm, >= 5 cold. The
best of --repeats runs counts (other processes on the machine only ever slow a run down).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from ..argtypes import nonnegative_int, positive_int
from ..config import DataConfig
from ..errors import SpkdistError
from ..shard_format import load_index
from ..shard_run import ShardOptions
from ..stream import train_loader
from .synth import make_hw4_shards

HW4_PADDING = -20.0  # what the homework's collate pads with
MAX_BATCHES = 500  # timed batches per run, unless one epoch of a small set holds fewer

EXAMPLE = "spkdist bench loader --scale 0.25 --cold"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of HW4's 64,666 utterances")
    parser.add_argument("--workers", type=positive_int, default=2, help="DataLoader workers of each loader")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="utterances per batch")
    parser.add_argument("--segment-len", type=positive_int, default=128, help="frames per random crop")
    parser.add_argument(
        "--batches",
        type=positive_int,
        help=f"timed batches per run (default: {MAX_BATCHES}, or as many as one epoch of the set allows)",
    )
    parser.add_argument("--warmup", type=nonnegative_int, default=10, help="untimed batches before timing")
    parser.add_argument("--repeats", type=positive_int, default=2, help="runs of each loader per cache state")
    parser.add_argument("--cold", action="store_true", help="also time with a dropped page cache (root)")
    parser.add_argument(
        "--shard-mb", type=float, default=ShardOptions.max_shard_mb, help="shard size cap of the set"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the loaders")
    parser.add_argument(
        "--dir", type=Path, help="where to put the temporary data (default: the system temp directory)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale <= 0 or min(args.workers, args.batch_size, args.repeats) < 1:
        raise SpkdistError("--scale, --workers, --batch-size and --repeats must be positive")
    with tempfile.TemporaryDirectory(prefix="spkdist-bench-", dir=args.dir) as tmp:
        hw4, shards = make_hw4_shards(
            Path(tmp), scale=args.scale, seed=args.seed, workers=args.workers, shard_mb=args.shard_mb
        )
        baseline = PerFileDataset(hw4, args.segment_len)
        available = len(baseline) // args.batch_size - args.warmup  # timed batches one epoch holds
        if args.batches is None:  # size the run to the data generated
            args.batches = min(MAX_BATCHES, available)
        if not 0 < args.batches <= available:
            raise SpkdistError(
                f"{len(baseline)} training utterances are too few for {args.warmup + max(1, args.batches)} "
                f"batches of {args.batch_size} in one epoch; raise --scale or lower --batches"
            )
        index = load_index(shards)
        loaders: dict[str, Callable[[], DataLoader]] = {
            "baseline": lambda: _baseline_loader(baseline, args),
            "ours": lambda: _our_loader(shards, index, args),
        }
        _read_through([*hw4.iterdir(), *shards.iterdir()])
        result = {"bench": "loader", **_settings(args, len(baseline))}
        result |= _compare("warm", loaders, args, drop_cache=False)
        if args.cold:
            reason = _drop_page_cache()  # a first try tells whether this machine allows it
            if reason is None:
                _warn_if_rereading(index, args)
                result |= _compare("cold", loaders, args, drop_cache=True)
            else:
                print(f"cold cache: unavailable ({reason})")
                result["cold_unavailable"] = reason
    return result


class PerFileDataset(Dataset):
    """The homework's training Dataset: one `torch.load` per utterance, a random crop of `segment_len`."""

    def __init__(self, hw4: Path, segment_len: int) -> None:
        speaker2id = json.loads((hw4 / "mapping.json").read_text())["speaker2id"]
        speakers = json.loads((hw4 / "metadata.json").read_text())["speakers"]
        self.items = [
            (hw4 / utt["feature_path"], speaker2id[name]) for name, utts in speakers.items() for utt in utts
        ]
        self.segment_len = segment_len

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, speaker = self.items[i]
        mel = torch.load(path)  # (mel_len, n_mels) float32
        if len(mel) > self.segment_len:
            start = random.randint(0, len(mel) - self.segment_len)
            mel = mel[start : start + self.segment_len]
        return mel, speaker


def pad_collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The homework's collate: (B, T, n_mels) padded with -20, and the (B,) speaker ids."""
    mels, speakers = zip(*batch, strict=True)
    return pad_sequence(mels, batch_first=True, padding_value=HW4_PADDING), torch.tensor(speakers)


def _baseline_loader(dataset: PerFileDataset, args: argparse.Namespace) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=pad_collate,
        pin_memory=False,  # as ours below: pinning measures the GPU host, not the loader
    )


def _our_loader(shards: Path, index: dict[str, Any], args: argparse.Namespace) -> DataLoader:
    return train_loader(
        str(shards),
        index,
        batch_size=args.batch_size,
        segment_len=args.segment_len,
        num_workers=args.workers,
        shuffle_buffer=DataConfig.shuffle_buffer,
        rank=0,
        world_size=1,
        seed=args.seed,
        epoch_batches=args.warmup + args.batches,  # one epoch covers the whole run
        pin_memory=False,
    )


def _settings(args: argparse.Namespace, utterances: int) -> dict[str, Any]:
    return {
        "scale": args.scale,
        "train_utterances": utterances,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "segment_len": args.segment_len,
        "timed_batches": args.batches,
        "repeats": args.repeats,
    }


def _compare(
    mode: str, loaders: dict[str, Callable[[], DataLoader]], args: argparse.Namespace, drop_cache: bool
) -> dict[str, Any]:
    """Best samples/s of each loader over the repeats (runs alternate), and their ratio."""
    runs: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, make in loaders.items():
            if drop_cache:
                _drop_page_cache()
            samples_per_s, read_kib = _time_loader(make(), args.warmup, args.batches, args.batch_size)
            runs[name].append(samples_per_s)
            disk = "" if read_kib is None else f", {read_kib / 1024:,.0f} MB read from disk"
            print(f"{mode} {name:<8} {samples_per_s:>9,.0f} samples/s{disk}")
    ours, baseline = max(runs["ours"]), max(runs["baseline"])
    print(f"{mode}: ours {ours:,.0f}, baseline {baseline:,.0f} samples/s, ratio {ours / baseline:.2f}")
    prefix = "" if mode == "warm" else f"{mode}_"
    return {
        f"{prefix}ours_samples_per_s": round(ours, 1),
        f"{prefix}baseline_samples_per_s": round(baseline, 1),
        f"{prefix}ratio": round(ours / baseline, 3),
        f"{prefix}runs": {name: [round(x, 1) for x in values] for name, values in runs.items()},
    }


def _time_loader(loader: DataLoader, warmup: int, batches: int, batch_size: int) -> tuple[float, int | None]:
    """Samples/s over `batches` batches after `warmup` ones, and KiB read from disk meanwhile."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    read_before = _disk_read_kib()
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - started
    read = None if read_before is None else _disk_read_kib() - read_before
    return batches * batch_size / seconds, read


def _read_through(paths: list[Path]) -> None:
    """Read every file once, so that the warm runs find all of them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def _drop_page_cache() -> str | None:
    """Write back dirty pages and drop the clean page cache; None, or why it could not be dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        return f"cannot write /proc/sys/vm/drop_caches: {e.strerror}; needs root on a writable /proc"
    return None


def _disk_read_kib() -> int | None:
    """KiB read from block devices since boot, all processes (/proc/vmstat pgpgin); None if unknown."""
    try:
        with open("/proc/vmstat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("pgpgin "))
    except (OSError, StopIteration):
        return None


def _warn_if_rereading(index: dict[str, Any], args: argparse.Namespace) -> None:
    """Cold runs of ours are flattered if its workers read more than the set holds: re-reads hit the cache."""
    needed = args.workers * DataConfig.shuffle_buffer + (args.warmup + args.batches) * args.batch_size
    have = index["splits"]["train"]["num_samples"]
    if needed > have:
        print(f"note: a cold run of ours reads ~{needed:,} samples of the {have:,} sharded; raise --scale")
