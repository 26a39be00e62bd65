"""A `spkdist shard` run: Corpus -> splits in writing order -> features in worker processes -> shards, index.

    hold_out       the held-out speakers (a seeded share, or names): all their utterances go to `heldout`
    split_corpus   train/valid (valid carved per speaker, seeded) and test; labeled splits shuffled (seeded)
    _encode_chunk  (worker) files -> checked (frames, n_mels) features in the shard dtype -> tar members
    shard          (main) clears OUT, writes each split through a SplitWriter, writes index.json last

Workers encode chunks of consecutive utterances (`ProcessPoolExecutor.map`, in order) into spool files
of finished tar members, so the main process only appends bytes, and the shards' contents do not depend
on the number of workers. Everything is seeded: the same input and seed give the same splits and
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from .errors import BadInput, BadItemError, SpkdistError
from .features import LogMel, Precomputed, cast, check_features
from .shard_format import (
    HELDOUT,
    SPLITS,
    ShardEntry,
    SplitWriter,
    build_index,
    clear_shard_dir,
    encode_sample,
    tar_sample,
    write_index,
)
from .sources import Corpus, Utterance

# Utterances per task sent to a worker: large enough that per-task overhead vanishes, small enough that
# work stays balanced, the progress bar moves and the spool files (~2 MB each on HW4) stay small.
CHUNK_SIZE = 32
# The workers' spool directory is created in OUT (same disk as the shards, not a small /tmp or /dev/shm),
# where the next run finds and removes what a killed run left.
SPOOL_PREFIX = ".spool-"


@dataclass(frozen=True)
class ShardOptions:
    """How to shard. index.json records `settings` (and `dtype`, with the features); `workers` and
    `progress` do not change the output."""

    workers: int = 2
    valid_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    heldout_fraction: float = 0.0  # share of the speakers held out (seeded), or
    heldout_names: tuple[str, ...] = ()  # the speakers held out, by name
    dtype: str = "float16"
    max_shard_samples: int = 10_000
    max_shard_mb: float = 256.0  # ~100-500 MB shards on HW4-sized data
    progress: bool = True

    @property
    def max_shard_bytes(self) -> int:
        return int(self.max_shard_mb * 1e6)

    @property
    def settings(self) -> dict[str, Any]:
        """What index.json records of these options."""
        return {
            "seed": self.seed,
            "valid_fraction": self.valid_fraction,
            "test_fraction": self.test_fraction,
            "heldout_fraction": self.heldout_fraction,
            "max_shard_samples": self.max_shard_samples,
            "max_shard_bytes": self.max_shard_bytes,
        }

    def __post_init__(self):
        # The command line checks its flags; these guard the library's own callers (programming errors).
        if self.workers < 1 or self.max_shard_samples < 1 or self.max_shard_mb <= 0:
            raise ValueError(f"workers and shard caps must be positive: {self}")
        if not (
            self.valid_fraction >= 0
            and self.test_fraction >= 0
            and self.valid_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                f"valid_fraction and test_fraction must be >= 0 and leave room for train: {self}"
            )
        if not 0 <= self.heldout_fraction < 1 or (self.heldout_fraction and self.heldout_names):
            raise ValueError(f"give a heldout_fraction in [0, 1) or heldout_names, not both: {self}")


@dataclass
class Summary:
    """What a run wrote, for the user and the benchmark."""

    out: Path
    samples: dict[str, int]  # per split
    shards: dict[str, int]  # per split
    speakers: int
    heldout_speakers: int
    frames: int
    hours: float | None  # audio inputs: frames x hop; None for precomputed features
    bytes: int
    seconds: float
    skipped: int

    def __str__(self) -> str:
        lines = [
            f"{split}: {self.samples[split]:,} utterances in {_count(self.shards[split], 'shard')}"
            for split in self.samples
        ]
        length = f"{self.hours:,.2f} hours" if self.hours is not None else f"{self.frames:,} frames"
        lines.append(
            f"{sum(self.samples.values()):,} utterances, {self.speakers:,} speakers"
            f"{f' ({self.heldout_speakers:,} held out)' if self.heldout_speakers else ''}, {length}, "
            f"{_count(sum(self.shards.values()), 'shard')}, {self.bytes / 1e6:,.1f} MB, {self.seconds:.1f} s"
            f" -> {self.out}"
        )
        if self.skipped:
            lines.append(f"skipped {_count(self.skipped, 'bad item')}, listed in index.json")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def hold_out(corpus: Corpus, options: ShardOptions) -> tuple[list[Utterance], dict[str, int], list[str]]:
    """(utterances, the classifier's speaker2id, held-out speaker names).

    The held-out speakers are `options.heldout_names`, or round(n x heldout_fraction) of the n labeled
    speakers drawn with the seed. Every labeled utterance of theirs goes to the `heldout` split, and the
    classifier's mapping keeps the other speakers, renumbered 0..k-1 in the source's own id order.
    """
    speakers = sorted(corpus.speaker2id, key=corpus.speaker2id.get)
    if options.heldout_names:
        heldout = set(options.heldout_names)
    elif options.heldout_fraction:
        count = round(len(speakers) * options.heldout_fraction)
        if not 1 <= count < len(speakers):
            raise SpkdistError(
                f"--heldout-speakers {options.heldout_fraction} holds out {count} of {len(speakers)} "
                "speakers; it must hold out at least one and leave at least one for training"
            )
        heldout = set(random.Random(f"{options.seed}:{HELDOUT}").sample(sorted(speakers), count))
    else:
        return corpus.utterances, corpus.speaker2id, []
    kept = [name for name in speakers if name not in heldout]
    if not kept:
        raise SpkdistError("--heldout-speakers holds out every speaker; none is left for training")
    utterances = [
        replace(u, split=HELDOUT) if u.speaker is not None and u.speaker in heldout else u
        for u in corpus.utterances
    ]
    return utterances, {name: i for i, name in enumerate(kept)}, sorted(heldout)


def split_corpus(
    utterances: list[Utterance], valid_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Utterance]]:
    """The utterances of each split, in writing order.

    `test` (if `test_fraction` > 0), then `valid` are carved from `train`, per speaker (round(n x fraction)
    of each speaker's utterances, seeded per speaker), unless the input names that split itself. Labeled
    splits are then shuffled (seeded) so that every shard mixes speakers; an unlabeled split (HW4 test)
    keeps the input's order.
    """
    splits = {split: [u for u in utterances if u.split == split] for split in SPLITS}
    for split, fraction in (("test", test_fraction), ("valid", valid_fraction)):
        if not splits[split] and fraction > 0:
            splits["train"], splits[split] = _carve(splits["train"], split, fraction, seed)
    for split, members in splits.items():
        if any(u.speaker is not None for u in members):
            random.Random(f"{seed}:{split}").shuffle(members)
    return splits


def _carve(
    train: list[Utterance], split: str, fraction: float, seed: int
) -> tuple[list[Utterance], list[Utterance]]:
    """(kept train, carved) with round(n x fraction) of each speaker's n train utterances moved to `split`."""
    by_speaker = defaultdict(list)
    for utterance in train:
        by_speaker[utterance.speaker].append(utterance)
    kept, carved = [], []
    for speaker in sorted(by_speaker):
        members = by_speaker[speaker]
        random.Random(f"{seed}:{split}:{speaker}").shuffle(members)  # per speaker: independent of the others
        n_carved = round(len(members) * fraction)
        carved += [replace(u, split=split) for u in members[:n_carved]]
        kept += members[n_carved:]
    return kept, carved


# ------------------------------------------------------------------------------- worker processes


@dataclass(frozen=True)
class _Job:
    """What every worker needs, sent once when the pool starts."""

    extractor: LogMel | Precomputed
    speaker2id: dict[str, int]
    dtype: str


class _Encoded(NamedTuple):
    """One utterance done by a worker; its tar members are in the chunk's spool file."""

    size: int  # bytes of its tar members (`tar_sample`): the main process appends them as they are
    num_frames: int
    input_bytes: int  # size of the input file, for the source fingerprint


_job: _Job | None = None  # this worker's job, set by _start_worker


def _start_worker(job: _Job) -> None:
    global _job
    _job = job
    torch.set_num_threads(1)  # one process per core already; intra-op threads would only contend
    # Ctrl-C signals the whole process group. Only the main process acts on it: it cancels the queued
    # work and lets the workers finish their chunk and exit (interrupted workers would block the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_chunk(spool: str, utterances: list[Utterance]) -> list[_Encoded | BadItemError]:
    """Encode consecutive utterances: their tar members, one after the other, into the file `spool`; per
    utterance its `_Encoded` or the BadItemError saying why it is unusable.

    The bytes go through a file rather than back through the pool's pipe, which would cost the main
    process (the bottleneck: it also hashes and writes every byte) several more copies of them; the
    shard benchmark runs ~15% faster this way.
    """
    results, members = [], []
    for utterance in utterances:
        try:
            sample, num_frames = _encode(utterance)
        except BadItemError as e:
            results.append(e)
            continue
        members.append(sample)
        results.append(_Encoded(len(sample), num_frames, os.stat(utterance.path).st_size))
    try:
        with open(spool, "wb") as f:
            f.writelines(members)
    except OSError as e:
        raise SpkdistError(f"{spool}: cannot write a worker's output ({e.strerror or e})") from None
    return results


def _encode(utterance: Utterance) -> tuple[bytes, int]:
    """One utterance as tar members and its frame count; BadItemError if it is unusable."""
    feats = _job.extractor(utterance.path)  # (frames, n_mels)
    check_features(feats, utterance.path, _job.extractor.n_mels, utterance.num_frames, _job.dtype)
    meta = {
        "speaker": utterance.speaker,
        "speaker_id": _job.speaker2id.get(utterance.speaker, -1),
        "source": utterance.source,
        "num_frames": len(feats),
        "order": utterance.order,
    }
    return tar_sample(encode_sample(utterance.key, cast(feats, _job.dtype), meta)), len(feats)


# ---------------------------------------------------------------------------------------- the run


def shard(
    corpus: Corpus, extractor: LogMel | Precomputed, out: Path, options: ShardOptions, bad: BadInput
) -> Summary:
    """Write `corpus` as shards and index.json into `out`, replacing what an earlier run left there."""
    started = time.perf_counter()
    utterances, speaker2id, heldout = hold_out(corpus, options)
    splits = split_corpus(utterances, options.valid_fraction, options.test_fraction, options.seed)
    queue = [u for split in SPLITS for u in splits[split]]
    if not queue:
        raise SpkdistError(f"{corpus.source['path']}: no utterances to shard")
    clear_shard_dir(out)
    for stale in out.glob(f"{SPOOL_PREFIX}*"):  # left by a killed run
        shutil.rmtree(stale)
    job = _Job(extractor, speaker2id, options.dtype)
    shards, frames, sizes = _write_shards(queue, job, out, options, bad)
    if not shards:
        raise SpkdistError(f"{corpus.source['path']}: every utterance was skipped as bad; nothing to shard")
    features = {**extractor.params, "dtype": options.dtype}
    source = {**corpus.source, "fingerprint": _fingerprint(corpus, sizes)}
    index = build_index(
        shards,
        frames,
        speaker2id,
        features,
        source,
        bad.skipped,
        options.settings,
        heldout,
        corpus.speaker2id,
    )
    write_index(out, index)
    return Summary(
        out=out,
        samples={split: sum(s.num_samples for s in entries) for split, entries in shards.items()},
        shards={split: len(entries) for split, entries in shards.items()},
        speakers=len(corpus.speaker2id),
        heldout_speakers=len(heldout),
        frames=sum(frames.values()),
        hours=sum(frames.values()) * extractor.hop_ms / 3.6e6 if isinstance(extractor, LogMel) else None,
        bytes=sum(s.bytes for entries in shards.values() for s in entries),
        seconds=time.perf_counter() - started,
        skipped=len(bad.skipped),
    )


def _write_shards(
    queue: list[Utterance], job: _Job, out: Path, options: ShardOptions, bad: BadInput
) -> tuple[dict[str, list[ShardEntry]], dict[str, int], dict[str, int]]:
    """Encode and write every utterance of `queue`: the finished shards of each non-empty split, the
    frames per split, and the input file size per written utterance key."""
    frames, sizes = dict.fromkeys(SPLITS, 0), {}
    with ExitStack() as stack:  # on an error: workers stopped first, then unfinished .partial files deleted
        writers = {
            split: stack.enter_context(
                SplitWriter(out, split, options.max_shard_samples, options.max_shard_bytes)
            )
            for split in SPLITS
        }
        for chunk, results, members in _encoded_chunks(queue, job, out, stack, options):
            for utterance, result in zip(chunk, results, strict=True):
                if isinstance(result, BadItemError):
                    bad.report(result)
                    continue
                writers[utterance.split].write_tar(members[: result.size])
                members = members[result.size :]
                frames[utterance.split] += result.num_frames
                sizes[utterance.key] = result.input_bytes
    return {split: writer.shards for split, writer in writers.items() if writer.shards}, frames, sizes


def _encoded_chunks(
    queue: list[Utterance], job: _Job, out: Path, stack: ExitStack, options: ShardOptions
) -> Iterator[tuple[list[Utterance], list[_Encoded | BadItemError], memoryview]]:
    """(utterances, their results, their tar members) for consecutive chunks of `queue`, in order,
    computed by `options.workers` processes, with a progress bar.

    If the caller stops early (a bad item, Ctrl-C), `stack` cancels the queued chunks and waits for the
    few in progress. Killing the workers instead, as multiprocessing.Pool.terminate does, can cut a
    result off mid-write and leave the pool's result thread waiting forever.
    """
    spool = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=SPOOL_PREFIX, dir=out)))
    executor = ProcessPoolExecutor(options.workers, initializer=_start_worker, initargs=(job,))
    stack.callback(executor.shutdown, wait=True, cancel_futures=True)
    chunks = [queue[start : start + CHUNK_SIZE] for start in range(0, len(queue), CHUNK_SIZE)]
    spools = [str(spool / str(number)) for number in range(len(chunks))]
    progress = stack.enter_context(
        tqdm(total=len(queue), unit="utt", desc="shard", disable=not options.progress, smoothing=0.1)
    )
    try:
        for chunk, path, results in zip(
            chunks, spools, executor.map(_encode_chunk, spools, chunks), strict=True
        ):
            yield chunk, results, memoryview(_take(path))
            progress.update(len(chunk))
    except BrokenProcessPool:
        raise SpkdistError(
            f"a worker process died (killed, out of memory, or crashed in a decoder) after {progress.n:,} of "
            f"{len(queue):,} utterances"
        ) from None


def _take(path: str) -> bytes:
    """The contents of a spool file, which is then deleted."""
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def _fingerprint(corpus: Corpus, sizes: dict[str, int]) -> str:
    """sha256 over the input's listing files and the (path, size) of every utterance file read, in input
    order: cheap (no second pass over the data) and it changes whenever files are added, removed,
    renamed, resized or relabeled."""
    digest = hashlib.sha256(json.dumps(corpus.source["sha256"], sort_keys=True).encode())
    for utterance in corpus.utterances:
        if utterance.key in sizes:
            digest.update(f"{utterance.source}\0{utterance.speaker}\0{sizes[utterance.key]}\n".encode())
    return digest.hexdigest()
