"""Training-test helpers: tiny labeled shards, small-run overrides, bounded multi-process launches.

Every launch runs in its own process group with a deadline, and the whole group is killed afterwards,
so a hung rank fails its test instead of the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from spkdist.shard_format import SplitWriter, build_index, encode_sample, write_index

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
PROBE = REPO / "tests" / "train_probe.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
N_SPEAKERS, N_MELS, HELDOUT_SPEAKERS = 4, 40, 3
TINY_SPLITS = {"train": 100, "valid": 20, "test": 12}


def write_shards(
    out: Path,
    splits: dict[str, Iterable[tuple[str, np.ndarray, dict]]],
    speaker2id: dict[str, int],
    features: dict,
    per_shard: dict[str, int],
    source: dict | None = None,
    heldout_speakers: list[str] = (),
) -> Path:
    """Write each split's (key, features, metadata) samples as `spkdist shard` would: capped shards, then
    index.json. `features` is index.json's feature record (n_mels, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    shards, frames = {}, {}
    for split, samples in splits.items():
        frames[split] = 0
        with SplitWriter(out, split, max_count=per_shard[split], max_bytes=1 << 30) as writer:
            for key, feats, meta in samples:
                writer.write(encode_sample(key, feats, meta))
                frames[split] += len(feats)
        shards[split] = writer.shards
    features = {"kind": "test", "dtype": "float16", **features}
    source = {"format": "test", "path": str(out), "fingerprint": "test", **(source or {})}
    index = build_index(shards, frames, speaker2id, features, source, [], {}, heldout_speakers, speaker2id)
    write_index(out, index)
    return out


def make_tiny_shards(out: Path, sizes: dict[str, int] = TINY_SPLITS, shard_count: int = 20) -> Path:
    """4 speakers, each with its own spectral shape, `sizes[split]` utterances per split, at most
    `shard_count` per shard: by default train spreads over 5 shards (not a multiple of 2 or 3 ranks, nor
    of ranks x 2 workers) and valid is ONE shard, so with 2 ranks one rank holds no validation shard.
    A `heldout` size adds that split: utterances of 3 more speakers, in no class of speaker2id.
    The same arguments always give the same shards (tests compare against figures measured on them)."""
    rng = np.random.default_rng(0)
    shapes = rng.normal(0.0, 1.0, size=(N_SPEAKERS, N_MELS))  # per-speaker mean over mel bins
    # drawn apart, so that adding held-out speakers leaves every other split as it was
    heldout_rng = np.random.default_rng(1)
    # and close to each other, so that their EER is neither 0 nor chance
    heldout_shapes = heldout_rng.normal(0.0, 0.1, size=(HELDOUT_SPEAKERS, N_MELS))

    def samples(split: str, size: int):
        held = split == "heldout"
        r, speakers = (heldout_rng, HELDOUT_SPEAKERS) if held else (rng, N_SPEAKERS)
        order = [(k % speakers, k // speakers) for k in range(size)]
        r.shuffle(order)
        for position, (speaker, k) in enumerate(order):
            length = int(r.integers(20, 60))
            shape = heldout_shapes[speaker] if held else shapes[speaker]
            feats = (shape + r.normal(0.0, 1.0, size=(length, N_MELS))).astype(np.float16)
            meta = {
                "speaker": f"held{speaker}" if held else f"spk{speaker}",
                "speaker_id": -1 if held else int(speaker),
                "source": f"{split}/{speaker}/{k}.pt",
                "num_frames": length,
                "order": position,
            }
            yield f"{split}-{position:05d}", feats, meta

    return write_shards(
        out,
        {split: samples(split, size) for split, size in sizes.items()},
        {f"spk{i}": i for i in range(N_SPEAKERS)},
        {"n_mels": N_MELS, "dtype": "float16"},
        dict.fromkeys(sizes, shard_count),
        {"format": "test"},
        [f"held{i}" for i in range(HELDOUT_SPEAKERS)] if "heldout" in sizes else [],
    )


def heldout_eer(checkpoint: Path, shards: Path, trials: int, seed: int, tmp: Path) -> float:
    """The EER a one-process `spkdist embed` of `checkpoint` gets on the trials that training with
    train.eval_verification (train.verification_trials=`trials`, train.seed=`seed`) scores."""
    from spkdist.open_set import run_embed
    from spkdist.shard_format import HELDOUT, load_index, split_speakers
    from spkdist.verification import Embeddings, cosine_scores, eer, make_trials, trial_rows

    run_embed(str(checkpoint), str(shards), HELDOUT, str(tmp / "heldout.npz"), batch_size=5, num_workers=0)
    embeddings = Embeddings.load(tmp / "heldout.npz")
    pairs = make_trials(*split_speakers(str(shards), load_index(shards), HELDOUT), trials, trials, seed)
    labels, enroll, test = trial_rows(embeddings, pairs)
    return eer(cosine_scores(embeddings.vectors, enroll, test), labels)[0]


def tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard, read with the standard library's tarfile: an
    independent check of what spkdist writes and reads."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def small_overrides(shards: Path, out: Path, steps: int = 4) -> list[str]:
    """Settings that keep a real recipe's architecture but make a run take seconds on CPU."""
    return [
        f"data.shards={shards}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "data.batch_size=8",
        "data.segment_len=32",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=50",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "log.tracker=none",
    ]


# Small enough for 3 processes on 2 cores, and still a Conformer with BatchNorm buffers.
TINY_CONFORMER = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.ffn_dim=32"]


def cli_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_launcher(processes: int = 2) -> list[str]:
    """`accelerate launch` of N gloo DDP processes on this machine, on a free port."""
    return [
        *LAUNCH,
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def deepspeed_launcher(name: str) -> list[str]:
    """`accelerate launch` with configs/accelerate/NAME.yaml, 2 CPU processes, on a free port."""
    return [
        *LAUNCH,
        "--config_file",
        str(REPO / f"configs/accelerate/{name}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def start_group(command: list[str], cwd: Path = REPO, **env: str) -> subprocess.Popen:
    """Start a launcher in its own process group, so a test can always kill it with all its workers."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(**env),
        cwd=cwd,
        start_new_session=True,
    )


def finish_groups(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every launcher (bounded), then kill whatever is left of their process groups."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def run_launcher(command: list[str], timeout: int = 300, **env: str) -> tuple[int, str]:
    """Run a launcher to completion (bounded); its exit code and output."""
    proc = start_group(command, **env)
    output = finish_groups([proc], timeout)[0]
    return proc.returncode, output


def run_checked(command: list[str], timeout: int = 300, **env: str) -> str:
    """Run a launcher that must succeed; its output."""
    returncode, output = run_launcher(command, timeout, **env)
    assert returncode == 0, output[-6000:]
    return output


def probe(prefix: Path, config: str, overrides: list[str]) -> list[str]:
    """The arguments that run tests/train_probe.py (train, then record each rank's end state)."""
    return [str(PROBE), str(prefix), "--config", config, *overrides]


def read_ranks(prefix: Path, world_size: int = 2) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(world_size)]


def wandb_run(run_dir: Path) -> tuple[dict[str, object], dict[str, object], Path]:
    """The history (every key ever logged, last value) and summary of the one offline W&B run under
    RUN_DIR/wandb, read from its .wandb transaction log with wandb's own record type; and its files/."""
    from wandb.proto import wandb_internal_pb2

    [run] = (run_dir / "wandb").glob("offline-run-*")
    history: dict[str, object] = {}
    summary: dict[str, object] = {}
    for raw in _log_records(next(run.glob("run-*.wandb")).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in ("history", "summary"):
            items = record.history.item if kind == "history" else record.summary.update
            target = history if kind == "history" else summary
            for item in items:
                target[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, summary, run / "files"


def _log_records(data: bytes):
    """The records of a LevelDB-style log (what a .wandb file is after its 7-byte header): 32 KiB blocks
    of chunks, each with a 7-byte header (checksum, length, type: full, first, middle, last)."""
    assert data[:4] == b":W&B", "not a W&B transaction log"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
