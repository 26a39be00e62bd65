"""The training and evaluation streams: webdataset tar shards -> padded batches of log-mel features.

Both streams are chains of small iterator -> iterator stages (WeSpeaker style) run inside DataLoader
workers:

    train: slot_shards -> read_shards -> random_crop [-> add_noise] [-> spec_augment] -> shuffle -> chunks
           -> collate
    eval:  eval_share(rank, worker) -> read_shards -> length_sorted -> collate           (finite)

and `StreamLoader` (a DataLoader) unpacks the bundles of batches the workers hand over.

`index.json` (`spkdist.shard_format.load_index`) is the source of truth: the shard list and per-shard
sample counts, the speakers and n_mels. A location is a local directory, any URL prefix `wds.gopen`
accepts (`pipe:cat /mnt/shared/shards`, `https://host/shards`) or a template with `{name}`
(`pipe:aws s3 cp s3://b/shards/{name} -`; see `spkdist.shard_format.shard_url`), so shards can live on
shared or object storage.

Speed: shards are read by `spkdist.shard_format`'s reader (no tarfile objects, no per-sample tensors);
here only the crop is copied and each batch is padded into one preallocated array. Past that, the cost
is the hand-over from worker to main process, paid per message and per storage: a training worker
sends bundles of 8 batches whose tensors all share one storage (`collate`). Batches are float32,
converted from the stored float16 in the worker (float16 batches would move half the bytes: ~18% more
samples/s, measured before bundling; not worth a second dtype contract).

Distributed use: rank and world size are passed in explicitly (`accelerator.process_index`,
`accelerator.num_processes`), nothing is read from the environment. The loaders must NOT go through
`accelerator.prepare`, which would re-shard or dispatch an IterableDataset a second time.
- Training: all ranks x workers share out one seeded sequence of random shard permutations
  (`slot_shards`), so they read different shards in different orders, reproducibly; crops and the
  shuffle buffer are seeded per (rank, worker, epoch). Each rank yields exactly `steps_per_epoch`
  batches per epoch however the shards divide ranks x workers, so no rank waits for another in a
  collective (no DDP hang). Workers are persistent: the epoch counter that varies the order lives in
  each of them.
- Evaluation: every rank's workers get a share of the split, whole shards where there are enough for
  all readers and samples within shards otherwise (`eval_share`), without resampling, so every sample
  is read exactly once across all ranks. Ranks hold unequal numbers of batches (some may hold none):
  reduce sums once at the end instead of gathering per batch.

Damaged shards (garbage, truncated, fewer samples than index.json says, unreadable `pipe:` command):
`on_bad_shard="raise"` stops with a `SpkdistError` naming the shard; `"warn"` warns (`BadShardWarning`,
naming the shard), skips the rest of it and never reads it again in that worker, and counts it in the
next batch's `Batch.bad_shards` (the count crosses from the worker to the main process with the batch).
A damaged shard never hangs the stream: every read checks for a short read, and a training stream whose
shards have all failed raises.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import SpkdistError
from .shard_format import Sample, decode_sample, read_tar_samples, shard_urls

OnBadShard = Literal["warn", "raise"]

# Training batches a worker hands to the main process at once, all in one storage (see `collate`).
TRAIN_BUNDLE_BATCHES = 8
# Evaluation batches are cut from chunks of this many batches' worth of samples sorted by length, so
# utterances of similar length share a batch and little compute goes into padding.
EVAL_SORT_BATCHES = 32


class BadShardWarning(UserWarning):
    """A damaged shard was skipped (`on_bad_shard="warn"`)."""


class Shard(NamedTuple):
    """One shard of a split: its position in index.json, its URL and its sample count there.

    A reader takes the samples at positions `part`, `part + parts`, ... of it: all of them by default,
    a share when evaluation splits one shard between several readers (`eval_share`).
    """

    number: int
    url: str
    num_samples: int
    part: int = 0
    parts: int = 1


@dataclass
class Batch:
    """A padded batch. Rows of `mels` are zero beyond their length; models must mask by `lengths`."""

    mels: torch.Tensor  # (B, T, n_mels) float32, T = the longest length in the batch
    lengths: torch.Tensor  # (B,) int64
    labels: torch.Tensor  # (B,) int64, speaker ids, -1 for unlabeled utterances
    keys: list[str]
    speakers: list[str | None]  # names: held-out speakers have one but no id
    sources: list[str]
    orders: list[int]  # position of each utterance in its source's own order (predictions come back in it)
    bad_shards: int = 0  # damaged shards skipped by the producing worker since its previous batch

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (`pin_memory=True`) for fast async copies."""
        return replace(
            self,
            mels=self.mels.pin_memory(),
            lengths=self.lengths.pin_memory(),
            labels=self.labels.pin_memory(),
        )

    def to(self, device: torch.device | str) -> Batch:
        """The tensors on `device`; asynchronous from pinned memory (see `pin_memory`)."""
        return replace(
            self,
            mels=self.mels.to(device, non_blocking=True),
            lengths=self.lengths.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
        )


class _StreamError(NamedTuple):
    """A SpkdistError on its way from a DataLoader worker to the main process."""

    message: str


class BadShards:
    """One worker's damaged shards: the policy, the shards to avoid from now on, the count not yet reported.

    Each DataLoader worker holds its own copy, so the count reaches the main process in the batches
    (`Batch.bad_shards`); a shard is skipped by each worker that meets it, once.
    """

    def __init__(self, policy: OnBadShard) -> None:
        if policy not in ("warn", "raise"):
            raise ValueError(f"on_bad_shard must be 'warn' or 'raise', got {policy!r}")
        self.policy = policy
        self.failed: set[int] = set()  # shard numbers
        self._unreported = 0

    def record(self, shard: Shard, reason: str) -> None:
        """Apply the policy to a damaged shard: raise, or warn, remember and count it."""
        message = f"{shard.url}: damaged shard: {reason}"
        if self.policy == "raise":
            raise SpkdistError(message)
        warnings.warn(f"{message}; skipped", BadShardWarning, stacklevel=2)
        self.failed.add(shard.number)
        self._unreported += 1

    def take(self) -> int:
        """Damaged shards met since the previous call (the count the next batch carries)."""
        count, self._unreported = self._unreported, 0
        return count


# ---------------------------------------------------------------------------------------------------------
# Stages: each takes an iterator and returns one.


def slot_shards(
    shards: Sequence[Shard], rng: random.Random, slot: int, slots: int, bad: BadShards
) -> Iterator[Shard]:
    """One reader slot's share of an endless, job-wide sequence of shard permutations.

    Every slot (a rank's worker: `slots` = ranks x workers) walks the same sequence, pass after pass
    over all shards in a new random order, and takes every `slots`-th shard starting at its own `slot`.
    Within a pass the slots thus read different shards (each shard once across the job when there are
    at least as many shards as slots) in different orders, without talking to each other. Unlike
    independent resampling, concurrent readers rarely duplicate a shard, so every pass of the data is
    read from storage once. Damaged shards are passed over; when all are, it raises instead of spinning.

    Args:
        shards: the split's shards.
        rng: the same in every slot (seeded by the run's seed and epoch), so the sequence is shared.
        slot, slots: this reader's index among all readers of the job, and their number.
        bad: the worker's damaged shards.
    Yields:
        Shard, forever.
    """
    position = 0
    while len(bad.failed) < len(shards):
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            if position % slots == slot and shard.number not in bad.failed:
                yield shard
            position += 1
    where = shards[0].url.rsplit("/", 1)[0]
    raise SpkdistError(f"{where}: all {len(shards)} training shards are damaged")


def read_shards(shards: Iterable[Shard], n_mels: int, bad: BadShards) -> Iterator[Sample]:
    """Decoded utterances of each shard in turn; a damaged shard goes to `bad` (raise, or warn and skip).

    A shard is damaged when its tar structure, a sample's .npy or .json, or its sample count (against
    index.json, which catches a shard truncated exactly between samples) is wrong, or it cannot be
    read at all. Samples yielded before the damage was found stay yielded.

    Args:
        shards: shards to read, in order.
        n_mels: expected feature dimension.
        bad: the worker's damaged shards and the policy.
    Yields:
        Sample, each a view into its shard's bytes: (frames, n_mels), float16 as stored; of a shard
        with `parts` > 1, only its share (other samples are counted, not decoded).
    """
    for shard in shards:
        count = 0
        try:
            for key, parts in read_tar_samples(shard.url):
                if count % shard.parts == shard.part:
                    yield decode_sample(key, parts, n_mels)
                count += 1
            if count != shard.num_samples:
                raise ValueError(f"{count} samples, index.json says {shard.num_samples}")
        except Exception as e:  # any failure to parse a shard's bytes is damage to that shard
            bad.record(shard, f"{type(e).__name__}: {e}")


def random_crop(utterances: Iterable[Sample], segment_len: int, rng: random.Random) -> Iterator[Sample]:
    """A random window of `segment_len` frames of each utterance; shorter ones are kept whole.

    The crop is copied out so that the utterance's bytes are freed at once and the shuffle buffer holds
    only crops (less memory, and measured a little faster than buffering views of whole utterances).

    Yields:
        Sample with mels (min(frames, segment_len), n_mels).
    """
    for utt in utterances:
        frames = len(utt.mels)
        if frames > segment_len:
            start = rng.randrange(frames - segment_len + 1)
            utt = utt._replace(mels=utt.mels[start : start + segment_len].copy())
        yield utt


@dataclass(frozen=True)
class SpecAugment:
    """SpecAugment (Park et al. 2019) settings: `time_masks` runs of up to `time_width` frames and
    `freq_masks` bands of up to `freq_width` mel bins per training crop. All zero: off."""

    time_masks: int = 0
    time_width: int = 0
    freq_masks: int = 0
    freq_width: int = 0

    @property
    def active(self) -> bool:
        return bool(self.time_masks and self.time_width) or bool(self.freq_masks and self.freq_width)


def spec_augment(utterances: Iterable[Sample], settings: SpecAugment, rng: random.Random) -> Iterator[Sample]:
    """Masked copies of training crops: a time mask sets its frames to the crop's per-bin means, a
    frequency mask its bins to the crop's mean, so masked values stay typical of the crop.

    Runs after the crop and before batching, so only real frames exist (padding comes in `collate`)
    and no mask falls on padding; never at evaluation. Widths are drawn in [0, max], positions
    uniformly, from the worker's seeded stream, so a seed gives the same masks.
    """
    for utt in utterances:
        mels = np.array(utt.mels)  # a writable copy: an uncropped utterance is a view of the shard
        frames, bins = mels.shape
        bin_means = mels.mean(axis=0, dtype=np.float32)  # (n_mels,)
        for _ in range(settings.time_masks):
            width = rng.randint(0, min(settings.time_width, frames))
            start = rng.randrange(frames - width + 1)
            mels[start : start + width, :] = bin_means  # frames [start, start + width)
        for _ in range(settings.freq_masks):
            width = rng.randint(0, min(settings.freq_width, bins))
            start = rng.randrange(bins - width + 1)
            mels[:, start : start + width] = bin_means.mean()  # mel bins [start, start + width)
        yield utt._replace(mels=mels)


@dataclass(frozen=True)
class NoiseAugment:
    """Additive noise on a share `prob` of the training crops, at a signal-to-noise ratio drawn uniformly
    in [snr_low, snr_high] dB. prob 0: off."""

    prob: float = 0.0
    snr_low: float = 5.0
    snr_high: float = 20.0

    @property
    def active(self) -> bool:
        return self.prob > 0


def add_noise(utterances: Iterable[Sample], settings: NoiseAugment, rng: random.Random) -> Iterator[Sample]:
    """Training crops with noise added where noise adds: to the mel energies, exp(log-mel).

    The noise has the spectral shape of the crop's own noise floor (each bin's 10th-percentile energy
    over the crop's frames: the recording's noise through the recording's channel, so no mel layout is
    assumed) and fluctuates per frame and bin (a gamma variable of mean 1 and shape 4), scaled so that
    the crop's mean energy is 10^(SNR / 10) times the noise's: the same utterance in a noisier room. Runs
    on the crop's real frames only (before `collate` pads); never at evaluation. Draws come from the
    worker's seeded stream, so a seed gives the same noise.
    """
    for utt in utterances:
        if rng.random() >= settings.prob:
            yield utt
            continue
        snr_db = rng.uniform(settings.snr_low, settings.snr_high)
        noise_rng = np.random.default_rng(rng.getrandbits(64))
        energy = np.exp(utt.mels.astype(np.float32))  # (frames, n_mels)
        floor = np.percentile(energy, 10, axis=0)  # (n_mels,)
        noise = floor * noise_rng.gamma(4.0, 0.25, size=energy.shape).astype(np.float32)  # (frames, n_mels)
        gain = energy.mean() / (noise.mean() * 10 ** (snr_db / 10))
        noisy = np.log(energy + gain * noise)  # (frames, n_mels)
        yield utt._replace(mels=noisy.astype(utt.mels.dtype))


def shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Items in random order through a buffer of `size`: each new item replaces a random buffered one.

    Yields:
        the same items, shuffled locally; the buffer is drained at the end of a finite input.
    """
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items; the last may be shorter.

    A full chunk is handed on only once the next item has arrived, so everything upstream has run
    (damaged shards included) before the last chunk goes out.
    """
    chunk: list[Any] = []
    for item in items:
        if len(chunk) == size:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def length_sorted(chunked: Iterable[list[Sample]], batch_size: int) -> Iterator[list[Sample]]:
    """Batches cut from each chunk after sorting it by length, so padding within a batch is small.

    Yields:
        lists of at most `batch_size` utterances of similar length.
    """
    for chunk in chunked:
        chunk.sort(key=lambda utt: len(utt.mels))
        yield from chunks(chunk, batch_size)


def collate(groups: Sequence[Sequence[Sample]], n_mels: int, bad_shards: int = 0) -> list[Batch]:
    """A Batch per group of utterances, the tensors of all of them views of one storage.

    A worker hands each storage to the main process through its own shared-memory segment, and each
    message costs queue and pickling work on both sides: both outweigh copying the data. One storage per
    bundle of batches instead of three tensors per batch measured 20k -> 30k samples/s with 2 workers.
    Rows are copied into a zero-padded array in the stored dtype, and torch then converts each batch to
    float32 at once (numpy's per-row float16 -> float32 cast measured 5x slower). Zero padding is
    arbitrary: models mask by `lengths`. The first batch carries `bad_shards`.
    """
    padded = [_pad(utterances, n_mels) for utterances in groups]  # (B, T, n_mels) each, stored dtype
    # Per batch: lengths and labels as int64, then the float32 features; sizes rounded up to 8 bytes so
    # that every view is aligned.
    sizes = [-(-(16 * len(x) + 4 * x.size) // 8) * 8 for x in padded]
    storage = torch.empty(sum(sizes), dtype=torch.uint8)
    batches = []
    for i, (utterances, x, part) in enumerate(zip(groups, padded, storage.split(sizes), strict=True)):
        size = len(utterances)
        ints = part[: 16 * size].view(torch.int64)  # (2B,)
        ints.numpy()[:] = [len(utt.mels) for utt in utterances] + [utt.speaker_id for utt in utterances]
        mels = part[16 * size : 16 * size + 4 * x.size].view(torch.float32).view(x.shape)  # (B, T, n_mels)
        mels.copy_(torch.from_numpy(x))
        batches.append(
            Batch(
                mels=mels,
                lengths=ints[:size],
                labels=ints[size:],
                keys=[utt.key for utt in utterances],
                speakers=[utt.speaker for utt in utterances],
                sources=[utt.source for utt in utterances],
                orders=[utt.order for utt in utterances],
                bad_shards=bad_shards if i == 0 else 0,
            )
        )
    return batches


def _pad(utterances: Sequence[Sample], n_mels: int) -> np.ndarray:
    """The utterances' features stacked and zero-padded to the longest: (B, T, n_mels), stored dtype."""
    padded = np.zeros(
        (len(utterances), max(len(utt.mels) for utt in utterances), n_mels), utterances[0].mels.dtype
    )
    for row, utt in zip(padded, utterances, strict=True):
        row[: len(utt.mels)] = utt.mels
    return padded


# ---------------------------------------------------------------------------------------------------------
# Datasets and loaders.


def _split_shards(location: str, index: dict[str, Any], split: str) -> list[Shard]:
    urls = shard_urls(location, index, split)
    counts = [entry["num_samples"] for entry in index["splits"][split]["shards"]]
    return [Shard(number, url, count) for number, (url, count) in enumerate(zip(urls, counts, strict=True))]


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _ShardStream(IterableDataset):
    """What both streams share: the split's shards, n_mels, the damaged shards met, the hand-over."""

    bundle_batches: int  # batches per hand-over to the main process

    def __init__(self, shards: list[Shard], n_mels: int, on_bad_shard: OnBadShard) -> None:
        self.shards = shards
        self.n_mels = n_mels
        self._bad = BadShards(on_bad_shard)  # per worker copy, kept across epochs by persistent workers

    def _bundles(self, groups: Iterable[list[Sample]]) -> Iterator[list[Batch] | _StreamError]:
        """Collated batches, `bundle_batches` at a time (see `collate`), for StreamLoader to unpack.

        A SpkdistError ends the stream as a `_StreamError` item, raised again by StreamLoader: torch would
        re-raise it from a worker with the worker's traceback in the message, and ours are one line.
        """
        try:
            for bundle in chunks(groups, self.bundle_batches):
                yield collate(bundle, self.n_mels, self._bad.take())
        except SpkdistError as e:
            yield _StreamError(str(e))


class TrainStream(_ShardStream):
    """Endless random crops of random shards, cut into epochs of exactly `steps` batches per rank."""

    bundle_batches = TRAIN_BUNDLE_BATCHES

    def __init__(
        self,
        shards: list[Shard],
        n_mels: int,
        *,
        batch_size: int,
        segment_len: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        seed: int,
        steps: int,
        on_bad_shard: OnBadShard,
        augment: SpecAugment,
        noise: NoiseAugment,
    ) -> None:
        super().__init__(shards, n_mels, on_bad_shard)
        self.batch_size = batch_size
        self.segment_len = segment_len
        self.augment = augment
        self.noise = noise
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps = steps
        self._epoch = -1  # per worker copy: persistent workers keep it across epochs

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[Batch] | _StreamError]:
        worker, num_workers = _worker()
        self._epoch += 1
        # String seeds are hashed with sha512 by `random`: the same in every process and run. The shard
        # sequence is shared by the whole job; crops and sample order are this worker's own.
        shard_rng = random.Random(f"spkdist-shards:{self.seed}:{self._epoch}")
        rng = random.Random(f"spkdist-train:{self.seed}:{self.rank}:{worker}:{self._epoch}")
        # The rank's exact step count, spread over its workers; the DataLoader takes from them in turn and
        # moves on when one is done, so the rank yields `steps` batches whatever the shards hold.
        my_steps = self.steps // num_workers + (worker < self.steps % num_workers)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        shards = slot_shards(self.shards, shard_rng, slot, slots, self._bad)
        utterances = read_shards(shards, self.n_mels, self._bad)
        utterances = random_crop(utterances, self.segment_len, rng)
        if self.noise.active:
            utterances = add_noise(utterances, self.noise, rng)
        if self.augment.active:
            utterances = spec_augment(utterances, self.augment, rng)
        utterances = shuffle(utterances, self.shuffle_buffer, rng)
        return self._bundles(islice(chunks(utterances, self.batch_size), my_steps))


class EvalStream(_ShardStream):
    """Every sample of this rank's shards once, whole, in length-sorted batches."""

    bundle_batches = 1  # whole utterances make large batches, whose hand-over costs little per sample

    def __init__(
        self,
        shards: list[Shard],
        n_mels: int,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        on_bad_shard: OnBadShard,
    ) -> None:
        super().__init__(shards, n_mels, on_bad_shard)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[Batch] | _StreamError]:
        worker, num_workers = _worker()
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        mine = eval_share(self.shards, slot, slots)
        chunked = chunks(read_shards(mine, self.n_mels, self._bad), EVAL_SORT_BATCHES * self.batch_size)
        return self._bundles(length_sorted(chunked, self.batch_size))


def eval_share(shards: Sequence[Shard], slot: int, slots: int) -> list[Shard]:
    """The evaluation shards (or shares of shards) of one reader slot: every sample once across slots.

    Whole shards go round-robin while there is a full round of them for all `slots` (a rank's worker:
    slots = ranks x workers); the remaining shards, fewer than the slots, are split by sample, each
    between the slots congruent to it. So every slot gets about the same work however many shards there
    are: one shard and 8 ranks means 8 readers of one eighth of it each, not one reader and 7 idle.
    """
    whole = len(shards) - len(shards) % slots
    mine = list(shards[slot:whole:slots])
    rest = len(shards) - whole
    if rest:
        first = slot % rest
        mine.append(shards[whole + first]._replace(part=slot // rest, parts=len(range(first, slots, rest))))
    return mine


def steps_per_epoch(index: dict[str, Any], batch_size: int, world_size: int) -> int:
    """Training batches each rank takes per epoch: one pass worth of samples over all ranks, rounded up."""
    return max(1, math.ceil(index["splits"]["train"]["num_samples"] / (batch_size * world_size)))


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")


class StreamLoader(DataLoader):
    """A DataLoader over a stream that hands over bundles of batches; iterating yields single Batches.

    `len()` is the number of batches per epoch where the stream knows it (training).
    """

    def __iter__(self) -> Iterator[Batch]:
        for bundle in super().__iter__():
            if isinstance(bundle, _StreamError):
                raise SpkdistError(bundle.message)
            yield from bundle


def _loader(
    dataset: _ShardStream, num_workers: int, pin_memory: bool | None, prefetch_factor: int
) -> StreamLoader:
    """The loader of a stream that batches itself; workers persist so that their epoch counters do."""
    return StreamLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def train_loader(
    location: str,
    index: dict[str, Any],
    *,
    batch_size: int,
    segment_len: int = 128,
    num_workers: int,
    shuffle_buffer: int,
    rank: int,
    world_size: int,
    seed: int,
    on_bad_shard: OnBadShard = "warn",
    epoch_batches: int | None = None,
    augment: SpecAugment = SpecAugment(),
    noise: NoiseAugment = NoiseAugment(),
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> StreamLoader:
    """The training loader of one rank: each epoch yields exactly the same number of batches on every rank.

    Args:
        location: shard directory or URL prefix; index: its `load_index(location)`.
        batch_size: utterances per batch on this rank.
        segment_len: frames per random crop; shorter utterances are kept whole.
        num_workers: DataLoader worker processes (0: read in the calling process).
        shuffle_buffer: samples held per worker for shuffling.
        rank, world_size: this process's place in the job (`accelerator.process_index`, `num_processes`).
        seed: base of every (rank, worker, epoch) random order; the same seed gives the same batches.
        on_bad_shard: "warn" (skip, warn and count in `Batch.bad_shards`) or "raise".
        epoch_batches: batches per epoch per rank; default `steps_per_epoch(index, batch_size, world_size)`.
        augment: SpecAugment masks applied to each crop (default: none).
        noise: additive noise on a share of the crops, before the masks (default: none).
        pin_memory: page-locked batches for fast GPU copies; default: when CUDA is available.
        prefetch_factor: bundles of batches each worker prepares ahead.
    Returns:
        StreamLoader yielding Batch; `len(loader)` is the number of batches per epoch.
    """
    _check_rank(rank, world_size)
    shards = _split_shards(location, index, "train")  # first: a clear error if there is no train split
    steps = steps_per_epoch(index, batch_size, world_size) if epoch_batches is None else epoch_batches
    dataset = TrainStream(
        shards,
        index["n_mels"],
        batch_size=batch_size,
        segment_len=segment_len,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        seed=seed,
        steps=steps,
        on_bad_shard=on_bad_shard,
        augment=augment,
        noise=noise,
    )
    return _loader(dataset, num_workers, pin_memory, prefetch_factor)


def eval_loader(
    location: str,
    index: dict[str, Any],
    split: str,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    on_bad_shard: OnBadShard = "raise",
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> StreamLoader:
    """The evaluation loader of one rank: its share of `split`, every sample once across ranks, whole.

    Ranks (and workers) get shards or shares of shards (`eval_share`), so their batch counts differ; a
    rank whose share is empty (a split of fewer utterances than ranks) yields none.
    Batches come length-sorted within chunks; use `Batch.orders`/`sources` to put results back in order.
    Arguments as for `train_loader`.
    """
    _check_rank(rank, world_size)
    dataset = EvalStream(
        _split_shards(location, index, split),
        index["n_mels"],
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        on_bad_shard=on_bad_shard,
    )
    return _loader(dataset, num_workers, pin_memory, prefetch_factor)
