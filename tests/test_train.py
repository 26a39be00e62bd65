"""The training job in one CPU process: every recipe, checkpoints and resume, signals at any moment, the
on-device step (no host reads, non-finite steps skipped), torch.compile, trackers.

Multi-process launches are in test_distributed.py and test_scale.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import N_SPEAKERS, TRAIN, cli_env, heldout_eer, make_tiny_shards, small_overrides, wandb_run

from spkdist import checkpoint, train
from spkdist.config import load_config
from spkdist.errors import SpkdistError
from spkdist.train import run


def train_cli(config: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """`python launch/train.py --config CONFIG OVERRIDES...` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, str(TRAIN), "--config", config, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )


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


def test_checkpoints_between_evaluations_name_the_step_of_their_metrics(tiny_shards, tmp_path):
    overrides = [
        *small_overrides(tiny_shards, tmp_path / "run", steps=4),
        "train.eval_every=2",
        "train.save_every=1",
        "train.keep_last=10",
    ]
    run(load_config("sample.yaml", overrides))
    root = checkpoint.checkpoint_dir(tmp_path / "run")
    meta = {p.name: json.loads((p / "meta.json").read_text()) for p in checkpoint.step_checkpoints(root)}
    steps = {name: (m["metrics_step"], bool(m["metrics"])) for name, m in meta.items()}
    assert steps == {
        "step-00000001": (-1, False),  # no evaluation yet
        "step-00000002": (2, True),
        "step-00000003": (2, True),  # step 2's metrics, and it says so
        "step-00000004": (4, True),
    }


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
        == f"spkdist: error: {tmp_path}/nope: shard directory does not exist"
    )


def test_sigterm_checkpoints_and_resume_reaches_the_final_step(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    steps = 300
    overrides = [*small_overrides(tiny_shards, out, steps=steps), "train.eval_every=1000"]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "--config", "sample.yaml", *overrides, "train.save_every=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    # signal once training is under way: the first step's checkpoint is there (an event, not a delay)
    deadline = time.time() + 240
    while not (checkpoint.checkpoint_dir(out) / "last").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "SIGTERM: stopped at step" in output and "train.resume=latest" in output
    stopped = checkpoint.load_model_file(out)
    assert 0 < stopped["step"] < steps and stopped["config"]["train"]["max_steps"] == steps

    resumed = run(load_config("sample.yaml", [*overrides, "train.resume=latest", "train.save_every=1000"]))
    assert f"at step {stopped['step']}" in capsys.readouterr().out  # continued, did not start over
    assert resumed.step == steps
    assert checkpoint.load_model_file(out)["step"] == steps
    # the learning-rate schedule continued too: it counted every step, before and after the stop
    schedule = torch.load(checkpoint.checkpoint_dir(out) / "last" / "custom_checkpoint_1.pkl")
    assert schedule == {"applied": steps}


def test_a_signal_during_start_up_stops_cleanly_and_handlers_are_restored(tiny_shards, tmp_path, monkeypatch):
    real_load_index = train.load_index

    def load_index_then_sigterm(location):  # the signal lands in the middle of set-up
        os.kill(os.getpid(), signal.SIGTERM)
        return real_load_index(location)

    monkeypatch.setattr(train, "load_index", load_index_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    result = run(load_config("sample.yaml", small_overrides(tiny_shards, tmp_path / "run")))
    assert result.stopped_by == "SIGTERM" and result.step == 0
    assert not checkpoint.step_checkpoints(checkpoint.checkpoint_dir(tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is before  # an in-process run leaves them as it found them


def test_a_nonfinite_step_changes_nothing(tiny_shards, tmp_path):
    overrides = [*small_overrides(tiny_shards, tmp_path / "run", steps=10), "optim.warmup_steps=3"]
    job = train.setup(load_config("boss.yaml", overrides))
    meter, health = train.Meter(job.accelerator.device), train.StepHealth(job.accelerator.device, 0)
    for _ in range(2):
        train.train_step(job, meter, health)

    def snapshot():
        optimizer = job.optimizer.state_dict()
        return (
            {k: v.clone() for k, v in job.model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()},
            job.schedule.last_lr(),
        )

    weights, moments, lr = snapshot()
    assert moments and all(state for state in moments.values())  # AdamW has state to compare
    finite_batches = job.train_batches
    poisoned = next(finite_batches)
    poisoned.mels[0, 0, 0] = float("nan")  # a real frame: the loss and every gradient become NaN
    job.train_batches = iter([poisoned])
    train.train_step(job, meter, health)
    assert int(health.skipped) == 1
    after_weights, after_moments, after_lr = snapshot()
    assert after_lr == lr and lr > 0
    for name, value in weights.items():
        assert torch.equal(after_weights[name], value), name
    for i, state in moments.items():
        for key, value in state.items():
            assert torch.equal(after_moments[i][key], value), (i, key)  # exp_avg, exp_avg_sq and step

    job.train_batches = finite_batches
    train.train_step(job, meter, health)  # the next finite step trains and advances the schedule
    assert int(health.skipped) == 1 and job.schedule.last_lr() != lr
    assert not torch.equal(job.model.state_dict()["head.weight"], weights["head.weight"])


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_no_host_reads_in_training_steps_between_log_steps(tiny_shards, tmp_path, monkeypatch):
    """Between log steps a step reads nothing back from the device (on a GPU each read is a stall)."""
    reads: Counter[int] = Counter()  # the step being run -> tensor reads made until the next step starts
    steps_started = [0]
    real_train_step = train.train_step

    def counted_train_step(*args):
        steps_started[0] += 1
        real_train_step(*args)

    monkeypatch.setattr(train, "train_step", counted_train_step)

    def counting(real):
        def read(self, *args, **kwargs):
            # The DataLoader draws its base seed with .item() at each epoch's start: host data, not a
            # device read. Everything else counts.
            if not sys._getframe(1).f_globals["__name__"].startswith("torch.utils.data"):
                reads[steps_started[0]] += 1
            return real(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    overrides = [
        *small_overrides(tiny_shards, tmp_path / "run", steps=20),
        "train.log_every=5",
        "train.eval_every=10",
        "train.save_every=10",
        "train.grad_accum=2",
    ]
    run(load_config("boss.yaml", overrides))
    assert steps_started[0] == 20
    assert {step: n for step, n in reads.items() if step % 5} == {}
    assert all(reads[step] > 0 for step in (5, 10, 15, 20))  # the counter does see log-step reads


def compiled_losses(tiny_shards: Path, out: Path, compile: bool, steps: int = 6) -> list[float]:
    overrides = [
        *small_overrides(tiny_shards, out, steps=steps),
        "model.dropout=0.0",  # the compiled graph draws dropout masks from another generator
        f"train.compile={str(compile).lower()}",
    ]
    job = train.setup(load_config("sample.yaml", overrides))
    meter, health = train.Meter(job.accelerator.device), train.StepHealth(job.accelerator.device, 0)
    losses = []
    for _ in range(steps):
        train.train_step(job, meter, health)
        losses.append(meter.flush(job.accelerator)["train/loss"])
    return losses


def test_compiled_training_follows_the_eager_loss_trajectory(tiny_shards, tmp_path):
    from torch._dynamo.utils import counters

    eager = compiled_losses(tiny_shards, tmp_path / "eager", compile=False)
    graphs = counters["stats"]["unique_graphs"]
    compiled = compiled_losses(tiny_shards, tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # it really was compiled
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]  # it trains


def test_compiled_evaluation_does_not_recompile_for_every_batch_shape(tiny_shards, tmp_path):
    from torch._dynamo.utils import counters

    cfg = load_config("sample.yaml", [*small_overrides(tiny_shards, tmp_path / "run"), "train.compile=true"])
    job = train.setup(cfg)
    model = job.accelerator.unwrap_model(job.model).eval()
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(2, 17)), int(rng.integers(5, 200))) for _ in range(20)]
    shapes[3] = (1, 77)  # a lone utterance: torch.compile specialises sizes 0 and 1 once
    graphs = []
    with torch.no_grad():
        for batch_size, frames in shapes:
            lengths = torch.from_numpy(rng.integers(1, frames + 1, batch_size))
            lengths[0] = frames
            model(torch.randn(batch_size, frames, 40), lengths)
            graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(shapes)) == 20 and graphs[0] > 0  # compiled at the first batch
    # each graph recompiles once as dynamic at its first new shape and once for batch size 1; then the
    # other 15 shapes compile nothing
    assert graphs[-1] == graphs[4]


def test_wandb_offline_run_holds_the_metrics_and_the_dashboard_panels(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = [o for o in small_overrides(tiny_shards, out) if not o.startswith("log.tracker")]
    run(load_config("sample.yaml", [*overrides, "log.tracker=wandb", "log.wandb_mode=offline"]))
    history, summary, files = wandb_run(out)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/data_wait_fraction", "valid/accuracy"):
        assert key in history, key
    kinds = {key: history[f"valid/{key}/_type"] for key in ("per_speaker", "confused_pairs", "embeddings")}
    assert kinds == dict.fromkeys(kinds, "table-file") and history["valid/confusion/_type"] == "image-file"
    assert summary["valid/best_accuracy"] == history["valid/accuracy"] and summary["valid/best_step"] == 4
    per_speaker = json.loads((files / history["valid/per_speaker/path"]).read_text())
    assert per_speaker["columns"] == ["speaker", "utterances", "correct", "accuracy"]
    assert sum(row[1] for row in per_speaker["data"]) == 20  # every validation utterance
    assert sum(row[2] for row in per_speaker["data"]) == round(20 * history["valid/accuracy"])
    embeddings = json.loads((files / history["valid/embeddings/path"]).read_text())
    assert embeddings["columns"] == ["x", "y", "speaker"] and len(embeddings["data"]) == 20


def test_verification_during_training_logs_eer_and_score_histograms(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = [o for o in small_overrides(tiny_shards, out) if not o.startswith("log.tracker")]
    verification = ["train.eval_verification=true", "train.verification_trials=40", "train.eval_every=2"]
    result = run(load_config("sample.yaml", [*overrides, *verification, "log.tracker=wandb"]))
    history, summary, _ = wandb_run(out)
    # the metrics: the same EER a separate `spkdist embed` of the final checkpoint scores on those trials
    assert result.metrics["eer"] == pytest.approx(
        heldout_eer(out / "checkpoints" / "last", tiny_shards, 40, seed=0, tmp=tmp_path), abs=1e-9
    )
    assert history["valid/eer"] == result.metrics["eer"] and 0 <= history["valid/min_dcf"] <= 1
    assert summary["valid/eer"] == result.metrics["eer"]  # the final EER, in the runs table
    assert 0 < result.metrics["eer"] < 0.5  # the held-out speakers are close, yet told apart
    for kind in ("target", "nontarget"):
        assert history[f"valid/{kind}_scores/_type"] == "histogram"
        assert sum(history[f"valid/{kind}_scores/values"]) == 40


def test_verification_needs_a_heldout_split(tmp_path):
    shards = make_tiny_shards(tmp_path / "shards", {"train": 20, "valid": 4})
    cfg = load_config(
        "sample.yaml", [*small_overrides(shards, tmp_path / "run"), "train.eval_verification=true"]
    )
    with pytest.raises(SpkdistError, match="eval_verification needs a heldout split"):
        run(cfg)


def test_tensorboard_event_files_hold_the_scalars(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = [o for o in small_overrides(tiny_shards, out) if not o.startswith("log.tracker")]
    run(load_config("sample.yaml", [*overrides, "log.tracker=tensorboard"]))
    events = out / "spkdist"  # OUTPUT/<log.project>; the hparams sit in a subdirectory of their own
    accumulator = EventAccumulator(str(events)).Reload()
    scalars = accumulator.Tags()["scalars"]
    for key in ("train/loss", "train/lr", "train/accuracy", "valid/loss", "valid/accuracy"):
        assert key in scalars, key
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in accumulator.Scalars("valid/accuracy")] == [4]
    # the config went in as hparams (nested values flattened): TensorBoard refused it before
    [hparams] = [path.parent for path in events.rglob("events.out.tfevents.*") if path.parent != events]
    plugins = EventAccumulator(str(hparams)).Reload().PluginTagToContent("hparams")
    assert b"optim.betas" in b"".join(plugins.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_no_device_syncs_in_training_steps_on_cuda(precision, tiny_shards, tmp_path):
    """On a GPU, CUDA itself reports any synchronising call during a step (a host read, a blocking copy)."""
    overrides = [
        *small_overrides(tiny_shards, tmp_path / "run", steps=10),
        f"train.mixed_precision={precision}",
    ]
    job = train.setup(load_config("boss.yaml", overrides))
    meter, health = train.Meter(job.accelerator.device), train.StepHealth(job.accelerator.device, 0)
    train.train_step(job, meter, health)  # first step: library initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train.train_step(job, meter, health)
    finally:
        torch.cuda.set_sync_debug_mode(0)
