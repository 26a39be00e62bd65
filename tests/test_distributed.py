"""DDP on CPU through `accelerate launch`: every recipe family, awkward evaluation splits, 3 ranks, signals,
mis-launches, and `spkdist evaluate/predict` shared across ranks.

Each run's metrics are checked against a one-process evaluation of the checkpoint it saved: ranks that
share the evaluation must count every utterance once and sum to the same loss.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import (
    LAUNCH,
    TINY_CONFORMER,
    TRAIN,
    ddp_launcher,
    finish_groups,
    heldout_eer,
    make_tiny_shards,
    probe,
    read_ranks,
    run_checked,
    run_launcher,
    small_overrides,
    start_group,
    wandb_run,
)

from spkdist import checkpoint
from spkdist.config import load_config
from spkdist.infer import run_evaluate, run_predict
from spkdist.shard_format import load_index
from spkdist.train import run


def train_ddp(
    tmp_path: Path, shards: Path, recipe: str, processes: int = 2, extra: tuple[str, ...] = ()
) -> list[dict]:
    """6 steps of `recipe` (tiny dims) on `processes` DDP ranks; each rank's probe record."""
    prefix = tmp_path / "probe"
    overrides = [*small_overrides(shards, tmp_path / "run", steps=6), *TINY_CONFORMER, *extra]
    output = run_checked([*ddp_launcher(processes), *probe(prefix, f"{recipe}.yaml", overrides)])
    assert f"{processes} process(es), MULTI_CPU" in output
    return read_ranks(prefix, processes)


def assert_one_job_and_exact_metrics(ranks: list[dict], run_dir: Path, shards: Path) -> None:
    """Ranks ended identical; their shared evaluation equals a one-process evaluation of the checkpoint."""
    world = len(ranks)
    assert [r["world_size"] for r in ranks] == [world] * world and [r["step"] for r in ranks] == [6] * world
    assert len({r["checksum"] for r in ranks}) == 1  # weights and BatchNorm statistics
    assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks)
    last = checkpoint.checkpoint_dir(run_dir) / "last"  # step 6, where the ranks' final metrics are from
    alone = run_evaluate(str(last), str(shards), "valid", batch_size=7, num_workers=0)
    assert (
        ranks[0]["metrics"]["num_samples"]
        == alone["num_samples"]
        == load_index(shards)["splits"]["valid"]["num_samples"]
    )
    assert ranks[0]["metrics"]["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert ranks[0]["metrics"]["accuracy"] == alone["accuracy"]
    if "eer" in ranks[0]["metrics"]:  # held-out speakers embedded by all ranks, scored on gathered rows
        assert ranks[0]["metrics"]["eer"] == pytest.approx(
            heldout_eer(last, shards, VERIFICATION_TRIALS, seed=0, tmp=run_dir), abs=1e-6
        )


VERIFICATION_TRIALS = 30
VERIFICATION = ("train.eval_verification=true", f"train.verification_trials={VERIFICATION_TRIALS}")


@pytest.mark.parametrize("recipe", ["sample", "boss"])  # Transformer, and Conformer with BatchNorm buffers
@pytest.mark.parametrize("valid", ["one shard", "one utterance"])
def test_ddp_evaluates_splits_smaller_than_the_world(
    recipe, valid, tiny_shards, one_utterance_valid, tmp_path
):
    shards = tiny_shards if valid == "one shard" else one_utterance_valid
    assert len(load_index(shards)["splits"]["valid"]["shards"]) == 1
    # eval at step 3 and 6, with workers: the valid shard is split by sample among 2 ranks x 2 workers
    # and with the held-out speakers' EER, whose split the 4 readers also share by sample
    extra = ("train.eval_every=3", "data.num_workers=2", *VERIFICATION)
    ranks = train_ddp(tmp_path, shards, recipe, extra=extra)
    assert_one_job_and_exact_metrics(ranks, tmp_path / "run", shards)


def test_three_ranks_with_shards_that_divide_neither_ranks_nor_readers(tiny_shards, tmp_path):
    index = load_index(tiny_shards)
    assert len(index["splits"]["train"]["shards"]) == 5  # 5 shards over 3 ranks, and 3 ranks x 2 workers
    ranks = train_ddp(tmp_path, tiny_shards, "boss", processes=3, extra=("data.num_workers=2",))
    assert_one_job_and_exact_metrics(ranks, tmp_path / "run", tiny_shards)


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(tiny_shards, tmp_path):
    prefix, run_dir, steps = tmp_path / "probe", tmp_path / "run", 2000
    overrides = [
        *small_overrides(tiny_shards, run_dir, steps=steps),
        "train.save_every=1",
        "train.eval_every=5000",
    ]
    launcher = start_group([*ddp_launcher(2), *probe(prefix, "sample.yaml", overrides)])
    deadline = time.time() + 240
    pid_file = Path(f"{prefix}.rank1.pid")
    while not ((checkpoint.checkpoint_dir(run_dir) / "last").exists() and pid_file.exists()):
        assert launcher.poll() is None and time.time() < deadline, "training never got under way"
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # rank 1 only, as a pre-empted node would
    output = finish_groups([launcher], timeout=240)[0]
    assert launcher.returncode == 0, output[-4000:]
    ranks = read_ranks(prefix)
    assert ranks[0]["step"] == ranks[1]["step"] < steps and ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[1]["stopped_by"] == "SIGTERM" and ranks[0]["stopped_by"] == "a signal on another rank"
    assert checkpoint.load_model_file(run_dir)["step"] == ranks[0]["step"]


def test_cpu_flag_launch_that_starts_one_process_is_refused(tiny_shards, tmp_path):
    command = [*LAUNCH, "--cpu", "--num_processes", "2", str(TRAIN), "--config", "sample.yaml"]
    returncode, output = run_launcher([*command, *small_overrides(tiny_shards, tmp_path / "run")])
    assert returncode != 0
    assert "spkdist: error: `accelerate launch --cpu --num_processes N` starts one process, not N" in output


def test_ranks_with_different_overrides_refuse_to_start(tiny_shards, tmp_path):
    overrides = small_overrides(tiny_shards, tmp_path / "run")
    returncode, output = run_launcher(
        [*ddp_launcher(2), *probe(tmp_path / "probe", "sample.yaml", overrides)],
        SPKDIST_PROBE_RANK1_OVERRIDES="train.max_steps=5",
        SPKDIST_PROBE_CLI="1",
    )
    assert returncode != 0
    message = (
        "spkdist: error: rank 1 runs a different job than rank 0: train.max_steps is 5 there, 4 on rank 0"
    )
    assert message in output


def test_ranks_with_different_local_shards_refuse_to_start(tmp_path):
    # two "nodes" whose local shards/ directories differ: the same config, a different index.json
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    make_tiny_shards(node0 / "shards")
    make_tiny_shards(node1 / "shards", {"train": 100, "valid": 8, "test": 12})
    overrides = [
        o for o in small_overrides(Path("shards"), tmp_path / "run") if not o.startswith("data.shards")
    ]
    command = [
        *ddp_launcher(2),
        *probe(tmp_path / "probe", "sample.yaml", [*overrides, "data.shards=shards"]),
    ]
    proc = start_group(command, cwd=node0, SPKDIST_PROBE_RANK1_CWD=str(node1), SPKDIST_PROBE_CLI="1")
    output = finish_groups([proc], timeout=300)[0]
    assert proc.returncode != 0
    assert "spkdist: error: rank 1 reads a different index.json than rank 0 under data.shards" in output


def test_evaluate_and_predict_share_the_split_under_a_two_process_launch(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(load_config("boss.yaml", [*small_overrides(tiny_shards, run_dir), *TINY_CONFORMER]))
    common = [
        "--checkpoint",
        str(run_dir),
        "--shards",
        str(tiny_shards),
        "--num-workers",
        "0",
        "--batch-size",
        "3",
    ]
    output = run_checked([*ddp_launcher(2), "-m", "spkdist.cli", "evaluate", *common, "--split", "valid"])
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 reports, once
    alone = run_evaluate(str(run_dir), str(tiny_shards), "valid", batch_size=5, num_workers=0)
    shared = json.loads(lines[0])
    assert shared["num_samples"] == alone["num_samples"] == 20  # not 2 x 20
    assert (
        shared["loss"] == pytest.approx(alone["loss"], rel=1e-5) and shared["accuracy"] == alone["accuracy"]
    )

    out = tmp_path / "predictions.csv"
    run_checked(
        [*ddp_launcher(2), "-m", "spkdist.cli", "predict", *common, "--split", "test", "--out", str(out)]
    )
    alone_out = tmp_path / "alone.csv"
    run_predict(str(run_dir), str(tiny_shards), "test", str(alone_out), batch_size=5, num_workers=0)
    rows = list(csv.reader(out.open()))
    assert len(rows) == 1 + 12 and rows == list(csv.reader(alone_out.open()))


def test_accelerate_launch_runs_the_trainer_as_a_module(tiny_shards, tmp_path):
    # `-m spkdist.train` needs no clone: no launch/train.py path
    overrides = small_overrides(tiny_shards, tmp_path / "run")
    output = run_checked([*ddp_launcher(2), "-m", "spkdist.train", "--config", "sample.yaml", *overrides])
    assert "2 process(es), MULTI_CPU" in output
    assert checkpoint.load_model_file(tmp_path / "run")["step"] == 4


def test_dashboard_panels_cover_every_rank_s_validation_share(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in small_overrides(tiny_shards, run_dir) if not o.startswith("log.tracker")]
    overrides += [*TINY_CONFORMER, "log.tracker=wandb", "log.wandb_mode=offline"]
    run_checked([*ddp_launcher(2), *probe(tmp_path / "probe", "boss.yaml", overrides)])
    history, summary, files = wandb_run(run_dir)  # rank 0 logs; the counts are the job's
    per_speaker = json.loads((files / history["valid/per_speaker/path"]).read_text())
    assert sum(row[1] for row in per_speaker["data"]) == 20  # both ranks' halves of the one valid shard
    embeddings = json.loads((files / history["valid/embeddings/path"]).read_text())
    assert len(embeddings["data"]) == 20 and {row[2] for row in embeddings["data"]} == {
        f"spk{i}" for i in range(4)
    }
    assert summary["valid/best_step"] == 4
