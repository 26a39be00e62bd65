"""The training job on CPU: every recipe, checkpoints and resume, signals, trackers, DDP with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spkdist import checkpoint
from spkdist.config import load_config
from spkdist.errors import SpkdistError
from spkdist.shards import SplitWriter, build_index, encode_sample, write_index
from spkdist.train import run

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
N_SPEAKERS, N_MELS = 4, 40


def make_tiny_shards(out: Path, train_per_speaker: int = 25, shard_count: int = 20) -> Path:
    """4 speakers, each with its own spectral shape; train spread over 5 shards (not a multiple of 2x2)."""
    rng = np.random.default_rng(0)
    shapes = rng.normal(0.0, 1.0, size=(N_SPEAKERS, N_MELS))  # per-speaker mean over mel bins
    speaker2id = {f"spk{i}": i for i in range(N_SPEAKERS)}
    splits, frames = {}, {}
    for split, per_speaker in (("train", train_per_speaker), ("valid", 5), ("test", 3)):
        order = [(s, k) for s in range(N_SPEAKERS) for k in range(per_speaker)]
        rng.shuffle(order)
        frames[split] = 0
        with SplitWriter(out, split, max_count=shard_count, max_bytes=1 << 30) as writer:
            for position, (speaker, k) in enumerate(order):
                length = int(rng.integers(20, 60))
                feats = (shapes[speaker] + rng.normal(0.0, 1.0, size=(length, N_MELS))).astype(np.float16)
                meta = {
                    "speaker": f"spk{speaker}",
                    "speaker_id": speaker,
                    "source": f"{split}/{speaker}/{k}.pt",
                    "num_frames": length,
                    "order": position,
                }
                writer.write(encode_sample(f"{split}-{position:05d}", feats, meta))
                frames[split] += length
        splits[split] = writer.shards
    write_index(
        out,
        build_index(
            splits, frames, speaker2id, {"n_mels": N_MELS, "dtype": "float16"}, {"format": "test"}, [], {}
        ),
    )
    return out


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny-shards"))


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


def train_cli(config: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """`python launch/train.py --config CONFIG OVERRIDES...` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, str(TRAIN), "--config", config, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.parametrize("recipe", ["sample", "medium", "strong", "boss"])
def test_each_recipe_trains_a_few_steps(recipe, tiny_shards, tmp_path):
    cfg = load_config(f"{recipe}.yaml", small_overrides(tiny_shards, tmp_path / "run"))
    result = run(cfg)
    assert result.step == 4 and result.stopped_by is None
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["num_samples"] == 5 * N_SPEAKERS
    saved = checkpoint.load_model_file(tmp_path / "run")
    assert saved["step"] == 4 and saved["config"]["model"]["name"] == recipe
    assert saved["config"]["train"]["max_steps"] == 4  # the checkpoint carries the resolved config


def test_bf16_mixed_precision_trains(tiny_shards, tmp_path):
    # a subprocess: Accelerate allows one mixed-precision setting per process
    overrides = [*small_overrides(tiny_shards, tmp_path / "run"), "train.mixed_precision=bf16"]
    result = train_cli("boss.yaml", overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    saved = checkpoint.load_model_file(tmp_path / "run")
    assert saved["step"] == 4 and saved["config"]["train"]["mixed_precision"] == "bf16"
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_learns_and_keeps_best_and_last(tiny_shards, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *small_overrides(tiny_shards, out, steps=30),
        "train.eval_every=10",
        "train.save_every=10",
        "train.keep_last=2",
        "optim.lr=3e-3",
    ]
    result = run(load_config("sample.yaml", overrides))
    assert result.metrics["accuracy"] >= 0.9  # speakers differ in spectral shape: easy to learn
    root = checkpoint.checkpoint_dir(out)
    steps = [p.name for p in checkpoint.step_checkpoints(root)]
    best = os.readlink(root / "best")
    assert os.readlink(root / "last") == "step-00000030"
    assert steps[-2:] == ["step-00000020", "step-00000030"] and best in steps
    assert len(set(steps) - {best}) <= 2  # retention: the newest 2, plus best
    assert not list(root.glob(".*.partial"))
    with pytest.raises(SpkdistError, match=r"holds checkpoints of an earlier run; continue it with"):
        run(load_config("sample.yaml", overrides))  # a fresh run never overwrites an earlier one


def test_nonfinite_losses_stop_the_run(tiny_shards, tmp_path):
    overrides = [
        *small_overrides(tiny_shards, tmp_path / "run", steps=50),
        "optim.lr=1e9",
        "optim.warmup_steps=0",
        "train.clip_grad_norm=0",
        "train.max_nonfinite=3",
    ]
    result = train_cli("sample.yaml", overrides)
    assert result.returncode == 2
    assert "3 steps in a row had a non-finite loss or gradient" in result.stderr.splitlines()[-1]


def test_missing_shards_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--config",
            "boss.yaml",
            f"data.shards={tmp_path}/nope",
            "log.tracker=none",
            f"train.output_dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"train: error: {tmp_path}/nope: shard directory does not exist"
    )


def test_sigterm_checkpoints_and_resume_reaches_the_final_step(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    steps = 3000  # far more than it takes before the signal, on a fast machine too
    overrides = [
        *small_overrides(tiny_shards, out, steps=steps),
        "train.save_every=5000",
        "train.eval_every=5000",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "--config", "sample.yaml", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # let it take some steps
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM: stopped at step" in output and "train.resume=latest" in output
    stopped = checkpoint.load_model_file(out)
    assert 0 < stopped["step"] < steps and stopped["config"]["train"]["max_steps"] == steps

    resumed = run(load_config("sample.yaml", [*overrides, "train.resume=latest"]))
    assert f"at step {stopped['step']}" in capsys.readouterr().out  # continued, did not start over
    assert resumed.step == steps
    assert checkpoint.load_model_file(out)["step"] == steps


def test_wandb_offline_run_holds_the_metrics(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = [o for o in small_overrides(tiny_shards, out) if not o.startswith("log.tracker")]
    run(load_config("sample.yaml", [*overrides, "log.tracker=wandb", "log.wandb_mode=offline"]))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (
        b"train/loss",
        b"train/lr",
        b"train/grad_norm",
        b"train/data_wait_fraction",
        b"valid/accuracy",
    ):
        assert key in logged


def launch_ddp(tiny_shards: Path, tmp_path: Path, extra: list[str], launcher: list[str]) -> list[dict]:
    """Train with 2 processes through `accelerate launch` and return each rank's probe record."""
    prefix = tmp_path / "probe"
    overrides = [*small_overrides(tiny_shards, tmp_path / "run", steps=6), "data.num_workers=2", *extra]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        str(REPO / "tests" / "train_probe.py"),
        str(prefix),
        "--config",
        "sample.yaml",
        *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in range(2)]


def test_two_process_ddp_ranks_agree(tiny_shards, tmp_path):
    ranks = launch_ddp(
        tiny_shards,
        tmp_path,
        [],
        [
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
    )
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [6, 6]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["num_samples"] == 5 * N_SPEAKERS  # every valid sample once across ranks
