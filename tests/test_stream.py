"""The shard streams: coverage and equal step counts over 2 ranks x 2 workers, exact evaluation, padding,
damaged shards, `pipe:` URLs.

The fixture shards hold float16 features whose column 0 is the sample's id and column 1 the frame
number, so every batch row can be traced back to its utterance and the crop position checked.
"""

from __future__ import annotations

import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_shards

from spkdist.errors import SpkdistError
from spkdist.shard_format import Sample, load_index
from spkdist.stream import (
    TRAIN_BUNDLE_BATCHES,
    BadShardWarning,
    Batch,
    Shard,
    collate,
    eval_loader,
    eval_share,
    steps_per_epoch,
    train_loader,
)

N_MELS = 8
SEGMENT = 16
# split -> (first id, samples, samples per shard): train 8+8+8+8+3 (5 shards do not divide 2 ranks x 2
# workers), valid 3+3+3+3+1, test 4+2 (unlabeled)
SPLITS = {"train": (0, 35, 8), "valid": (100, 13, 3), "test": (200, 6, 4)}
TRAIN_IDS = set(range(35))


def num_frames(uid: int) -> int:
    """5..40 frames: some shorter than SEGMENT (kept whole), most longer (cropped)."""
    return 5 + (uid * 7) % 36


def label(uid: int) -> int:
    return -1 if uid >= SPLITS["test"][0] else uid % 4


def features(uid: int) -> np.ndarray:
    x = np.random.default_rng(uid).uniform(-1, 1, (num_frames(uid), N_MELS)).astype(np.float16)
    x[:, 0] = uid
    x[:, 1] = np.arange(len(x))
    return x


def write_shard_dir(out: Path) -> Path:
    def samples(split: str):
        first, count, _ = SPLITS[split]
        for uid in range(first, first + count):
            meta = {
                "speaker": None if label(uid) < 0 else f"spk{label(uid)}",
                "speaker_id": label(uid),
                "source": f"{split}/utt{uid}.pt",
                "num_frames": num_frames(uid),
                "order": uid - first,
            }
            yield f"u{uid:04d}", features(uid), meta

    speakers = {f"spk{i}": i for i in range(4)}
    per_shard = {split: per_shard for split, (_, _, per_shard) in SPLITS.items()}
    return write_shards(
        out, {split: samples(split) for split in SPLITS}, speakers, {"n_mels": N_MELS}, per_shard
    )


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_shard_dir(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def damaged_dir(shard_dir, tmp_path) -> Path:
    """A copy of the shards with train-000001 replaced by garbage and train-000003 cut in half."""
    out = tmp_path / "damaged"
    shutil.copytree(shard_dir, out)
    garbage = out / "train-000001.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(garbage.stat().st_size))
    truncated = out / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return out


def train(location: str | Path, **overrides) -> torch.utils.data.DataLoader:
    """`train_loader` with the fixture's small settings (batch 4, crops of SEGMENT, one rank, no workers)."""
    settings = dict(
        batch_size=4, segment_len=SEGMENT, num_workers=0, shuffle_buffer=4, rank=0, world_size=1, seed=0
    )
    return train_loader(str(location), load_index(location), **(settings | overrides))


def evaluate(location: str | Path, split: str, **overrides) -> torch.utils.data.DataLoader:
    """`eval_loader` with the fixture's small settings (batch 2, one rank, no workers)."""
    settings = dict(batch_size=2, num_workers=0, rank=0, world_size=1)
    return eval_loader(str(location), load_index(location), split, **(settings | overrides))


def row_ids(batch: Batch) -> list[int]:
    return [int(uid) for uid in batch.mels[:, 0, 0]]


def check_batch(batch: Batch, whole: bool) -> None:
    """Every row is a crop (or, `whole`, all) of the utterance its key names, zero beyond its length."""
    assert batch.mels.dtype == torch.float32 and batch.mels.shape[2] == N_MELS
    assert batch.lengths.dtype == torch.int64 and batch.labels.dtype == torch.int64
    assert batch.mels.shape[1] == int(batch.lengths.max())
    for i, uid in enumerate(row_ids(batch)):
        split = next(s for s, (first, count, _) in SPLITS.items() if first <= uid < first + count)
        assert batch.keys[i] == f"u{uid:04d}" and batch.sources[i] == f"{split}/utt{uid}.pt"
        assert batch.orders[i] == uid - SPLITS[split][0] and batch.labels[i] == label(uid)
        length = int(batch.lengths[i])
        assert length == (num_frames(uid) if whole else min(num_frames(uid), SEGMENT))
        start = int(batch.mels[i, 0, 1])  # frame number of the crop's first frame
        assert torch.equal(
            batch.mels[i, :length], torch.from_numpy(features(uid)[start : start + length]).float()
        )
        assert not batch.mels[i, length:].any()


def test_train_two_ranks_two_workers_equal_steps_and_full_coverage(shard_dir):
    index = load_index(shard_dir)
    steps = steps_per_epoch(index, batch_size=4, world_size=2)
    assert steps == math.ceil(35 / (4 * 2))
    seen = set()
    for rank in range(2):
        loader = train(shard_dir, num_workers=2, shuffle_buffer=6, rank=rank, world_size=2, seed=3)
        assert len(loader) == steps
        for _ in range(4):
            batches = list(loader)
            assert len(batches) == steps  # every rank, every epoch: no rank waits for another in DDP
            for batch in batches:
                check_batch(batch, whole=False)
                assert len(batch) == 4 and batch.bad_shards == 0
                seen.update(row_ids(batch))
    assert seen == TRAIN_IDS


def shard_orders(shard_dir: Path, rank: int, seed: int) -> list[list[int]]:
    """The shards each of the two workers of `rank` read, in order (no shuffle buffer to blur it)."""
    bundle = TRAIN_BUNDLE_BATCHES
    loader = train(
        shard_dir,
        num_workers=2,
        shuffle_buffer=1,
        rank=rank,
        world_size=2,
        seed=seed,
        epoch_batches=2 * bundle,
    )
    orders: list[list[int]] = [[], []]
    for i, batch in enumerate(loader):  # a bundle of batches from each worker in turn: here one each
        for uid in row_ids(batch):
            shard = uid // SPLITS["train"][2]
            if not orders[i // bundle] or orders[i // bundle][-1] != shard:
                orders[i // bundle].append(shard)
    return orders


def test_train_readers_share_out_shards_in_different_orders_reproducibly(shard_dir):
    orders = shard_orders(shard_dir, rank=0, seed=1) + shard_orders(shard_dir, rank=1, seed=1)
    assert all(len(order) >= 3 for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    # the 4 readers (2 ranks x 2 workers) share out the first pass over the 5 shards: no shard twice
    assert len({order[0] for order in orders} | {orders[0][1]}) == 5
    assert shard_orders(shard_dir, rank=1, seed=1) == orders[2:]
    assert shard_orders(shard_dir, rank=1, seed=2) != orders[2:]


def test_epoch_batches_overrides_the_epoch_length(shard_dir):
    loader = train(shard_dir, batch_size=3, epoch_batches=7)
    assert len(loader) == 7 and len(list(loader)) == 7


@pytest.mark.parametrize(
    ("split", "world_size", "num_workers"),
    [("valid", 2, 2), ("valid", 3, 2), ("valid", 1, 0), ("test", 3, 0)],  # 5 or 2 shards, 1 to 6 readers
)
def test_eval_covers_every_sample_exactly_once_whole(shard_dir, split, world_size, num_workers):
    counts: Counter[int] = Counter()
    per_rank = []
    for rank in range(world_size):
        rows = 0
        for batch in evaluate(shard_dir, split, num_workers=num_workers, rank=rank, world_size=world_size):
            check_batch(batch, whole=True)
            assert batch.lengths.tolist() == sorted(batch.lengths.tolist())  # length-sorted batches
            counts.update(row_ids(batch))
            rows += len(batch)
        per_rank.append(rows)
    first, count, _ = SPLITS[split]
    assert counts == Counter(range(first, first + count))
    # shared by all ranks, fewer shards than readers included: none idles, none does twice its share
    assert min(per_rank) > 0 and max(per_rank) <= 2 * math.ceil(count / world_size)


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6, 8])
def test_eval_share_takes_each_sample_once_and_balances_the_readers(n_shards, slots):
    shards = [Shard(i, f"s{i}", 10) for i in range(n_shards)]
    taken: Counter[tuple[int, int]] = Counter()
    loads = []
    for slot in range(slots):
        share = eval_share(shards, slot, slots)
        for shard in share:
            taken.update((shard.number, k) for k in range(shard.part, shard.num_samples, shard.parts))
        loads.append(sum(len(range(s.part, s.num_samples, s.parts)) for s in share))
    assert taken == Counter((i, k) for i in range(n_shards) for k in range(10))
    # every reader works, and none reads more than twice its even share (one reader: all of it)
    assert min(loads) > 0 and max(loads) <= 2 * math.ceil(10 * n_shards / slots)


def test_collate_pads_with_zeros_and_reports_lengths():
    utts = [
        Sample(f"u{uid}", features(uid)[:length], label(uid), f"s{uid}", uid)
        for uid, length in [(3, 4), (8, 9), (1, 2)]
    ]
    batch, other = collate([utts, utts[:1]], N_MELS, bad_shards=1)
    assert batch.mels.shape == (3, 9, N_MELS) and batch.lengths.tolist() == [4, 9, 2]
    for row, utt in zip(batch.mels, utts, strict=True):
        assert torch.equal(row[: len(utt.mels)], torch.from_numpy(utt.mels).float())
        assert not row[len(utt.mels) :].any()
    assert batch.labels.tolist() == [3, 0, 1] and batch.orders == [3, 8, 1] and batch.bad_shards == 1
    # the second batch of the bundle shares the storage, not the values
    assert other.mels.shape == (1, 4, N_MELS) and torch.equal(other.mels[0], batch.mels[0, :4])
    assert other.lengths.tolist() == [4] and other.labels.tolist() == [3] and other.bad_shards == 0
    moved = batch.to("cpu")
    assert torch.equal(moved.mels, batch.mels) and moved.keys == batch.keys


def test_damaged_shards_are_warned_about_counted_and_skipped(damaged_dir):
    index = load_index(damaged_dir)
    loader = train(damaged_dir, world_size=2)
    with pytest.warns(BadShardWarning) as caught:
        epochs = [list(loader) for _ in range(3)]
    assert sorted({str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught}) == [
        "train-000001.tar",
        "train-000003.tar",
    ]
    assert [len(batches) for batches in epochs] == [steps_per_epoch(index, 4, 2)] * 3
    assert sum(batch.bad_shards for batches in epochs for batch in batches) == 2  # each once: then avoided
    for batch in (batch for batches in epochs for batch in batches):
        check_batch(batch, whole=False)


def test_damaged_shards_are_counted_from_worker_processes(damaged_dir):
    index = load_index(damaged_dir)
    loader = train(damaged_dir, num_workers=2, rank=1, world_size=2)
    epochs = [list(loader) for _ in range(4)]
    assert [len(batches) for batches in epochs] == [steps_per_epoch(index, 4, 2)] * 4
    # each worker meets each damaged shard once, then avoids it
    assert sum(batch.bad_shards for batches in epochs for batch in batches) == 4


def test_damaged_shard_raises_when_configured(damaged_dir):
    loader = train(damaged_dir, on_bad_shard="raise")
    with pytest.raises(SpkdistError, match=r"train-00000[13]\.tar: damaged shard"):
        list(loader)


def test_eval_raises_on_a_damaged_shard_in_a_worker(shard_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    (out / "valid-000002.tar").write_bytes(b"not a tar file" * 100)
    loader = evaluate(out, "valid", num_workers=2, rank=1, world_size=2)  # rank 1 reads shard 2
    with pytest.raises(SpkdistError, match=r"^\S+/valid-000002\.tar: damaged shard: ValueError: [^\n]+$"):
        list(loader)  # the worker's one-line message, not torch's re-raise with a traceback


def test_shard_cut_between_samples_is_caught_by_the_index_count(shard_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    path = out / "valid-000000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[4].offset  # 3 samples of 2 members: cut after the second sample
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(
        SpkdistError, match=r"valid-000000\.tar: damaged shard: .*2 samples, index.json says 3"
    ):
        list(evaluate(out, "valid"))


def test_all_training_shards_damaged_raises_instead_of_spinning(shard_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    for path in out.glob("train-*.tar"):
        path.write_bytes(b"\0garbage" * 200)
    with (
        pytest.warns(BadShardWarning),
        pytest.raises(SpkdistError, match="all 5 training shards are damaged"),
    ):
        list(train(out))


def test_pipe_urls(shard_dir):
    location = f"pipe:cat {shard_dir}"
    counts: Counter[int] = Counter()
    for batch in evaluate(location, "valid", num_workers=2):
        check_batch(batch, whole=True)
        counts.update(row_ids(batch))
    assert counts == Counter(range(100, 113))
    batches = list(train(location, num_workers=2))
    assert len(batches) == steps_per_epoch(load_index(location), 4, 1)
    for batch in batches:
        check_batch(batch, whole=False)
