"""The training job: config -> `setup` (Accelerator, model, optimizer, schedule, streams) -> `fit`.

Run with `accelerate launch launch/train.py --config configs/boss.yaml [section.key=value ...]` on any
number of processes, or as plain `python launch/train.py ...` for one CPU or GPU process.

The data loaders are deliberately not passed through `accelerator.prepare`: the shard streams already split
the data by rank and worker (and give every rank the same number of training batches), whereas a prepared
IterableDataset would be re-dispatched from rank 0.

The hot-loop rule: a training step never reads a value back from the device, so the host can queue step
k+1 while the GPU still runs step k. Beyond the gradient all-reduce, a step waits on the other ranks only
for the stop vote cast one step earlier on a CPU gloo group (done by then: a wait of microseconds).
Everything a step decides stays a tensor: the gradient norm, whether it is finite, the skipped-step count,
the loss and accuracy sums. A non-finite step is skipped on the device: the fused AdamW kernel gets the
step's verdict as `found_inf` (GradScaler's mechanism) and leaves weights, moments and step counts as
they were, the buffers the forward passes changed are put back, and the device-side schedule
(`spkdist.schedules.WarmupCosine`) does not advance. Those
tensors are read only at log steps (`train.log_every`), and at evaluation and checkpoint steps. Signals
are agreed on without stalling (`spkdist.distributed.StopVote`: an asynchronous vote, read one step
later). Under DeepSpeed the engine clips and steps inside `accelerator.backward`, before the loop sees the
gradient norm, so skipping a non-finite update is DeepSpeed's own business (its fp16 loss scaler does);
the loop still counts such steps and stops the run after `train.max_nonfinite` of them in a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from . import __version__, checkpoint
from .config import CONFIG_VERSION, Config, dump_config, load_config
from .dashboards import EvalDetails, evaluation_panels, score_histograms
from .distributed import (
    StopRequest,
    StopVote,
    any_rank,
    check_same_job,
    is_zero3,
    job_description,
    leave_process_group,
    lockstep,
    make_accelerator,
    sync_buffers,
)
from .errors import SpkdistError, exit_code
from .evaluation import embed, evaluate
from .fsutil import atomic_write_bytes
from .models import MarginHead, build_model
from .schedules import WarmupCosine
from .shard_format import HELDOUT, load_index, split_speakers
from .stream import Batch, NoiseAugment, SpecAugment, StreamLoader, eval_loader, train_loader
from .verification import Embeddings, cosine_scores, eer, make_trials, min_dcf, trial_rows


@dataclasses.dataclass
class TrainState:
    """Loop counters saved with every checkpoint (via `accelerator.register_for_checkpointing`)."""

    step: int = 0
    best_accuracy: float = -1.0
    best_step: int = -1
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclasses.dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run hands back to its caller."""

    step: int
    metrics: dict[str, float]
    model: torch.nn.Module
    stopped_by: str | None


@dataclasses.dataclass
class Verification:
    """What `validate` needs to score held-out speakers: their stream and a fixed trial list."""

    loader: StreamLoader
    trials: list[tuple[int, str, str]]  # (label, enroll key, test key), the same on every rank


@dataclasses.dataclass
class Job:
    """A run, set up and ready to fit: everything `setup` builds and `fit` uses."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared: DDP- or DeepSpeed-wrapped when distributed
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    state: TrainState
    train_batches: Iterator[Batch]  # endless
    valid_loader: StreamLoader
    heldout: Verification | None  # train.eval_verification: the held-out speakers and their trials
    n_mels: int
    payload: dict[str, Any]  # stored in every model.pt beside the weights: config, speakers, n_mels
    out: Path


def run(cfg: Config) -> TrainResult:
    """Train as `cfg` says; return the final step, validation metrics and (unwrapped) model."""
    with StopRequest() as stop:  # first of all: from here on a signal is a clean stop, start-up included
        try:
            return fit(setup(cfg), stop)
        finally:
            leave_process_group()


def setup(cfg: Config) -> Job:
    """Accelerator, one-job checks, model, optimizer, schedule, streams and trackers: all but the loop."""
    out = Path(cfg.train.output_dir)
    if not cfg.train.resume and checkpoint.step_checkpoints(checkpoint.checkpoint_dir(out)):
        raise SpkdistError(
            f"{out}: holds checkpoints of an earlier run; continue it with train.resume=latest "
            "or choose another train.output_dir"
        )
    accelerator = make_accelerator(
        cfg.train.collective_timeout,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=str(out),
    )
    accelerator.print(
        f"spkdist {__version__}: {accelerator.num_processes} process(es), "
        f"{accelerator.distributed_type.value}, {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )
    index = load_index(cfg.data.shards)
    check_same_job(accelerator, job_description(cfg.to_dict(), index))
    accelerator.print(dump_config(cfg), end="")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", dump_config(cfg).encode())

    n_mels, speaker2id = index["n_mels"], index["speaker2id"]
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, n_mels=n_mels, n_speakers=len(speaker2id))
    if cfg.train.compile:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise SpkdistError("train.compile is not supported under DeepSpeed launches; use DDP")
        # In place: the module (and so its state_dict keys and checkpoints) stays the same object. With
        # the default dynamic=None, torch.compile makes a dimension dynamic at its first change of size,
        # so evaluation batches of ever-changing lengths do not each recompile.
        model.compile(mode=cfg.train.compile_mode)
    optimizer = make_optimizer(model, cfg)
    fill_deepspeed_config(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = make_schedule(optimizer, cfg, accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state, schedule)
    resume_dir = checkpoint.find_resume_dir(out, cfg.train.resume) if cfg.train.resume else None
    if resume_dir is not None:
        checkpoint.check_resumable(resume_dir, registered=2)
        accelerator.load_state(str(resume_dir))
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")

    rank, world = accelerator.process_index, accelerator.num_processes
    train_batches = forever(
        train_loader(
            cfg.data.shards,
            index,
            batch_size=cfg.data.batch_size,
            segment_len=cfg.data.segment_len,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            rank=rank,
            world_size=world,
            on_bad_shard=cfg.data.on_bad_shard,
            seed=cfg.train.seed + state.step,  # a resumed run draws fresh data instead of replaying
            augment=SpecAugment(
                cfg.data.time_masks, cfg.data.time_mask_width, cfg.data.freq_masks, cfg.data.freq_mask_width
            ),
            noise=NoiseAugment(cfg.data.noise_prob, *cfg.data.noise_snr),
        )
    )
    valid_loader = eval_loader(
        cfg.data.shards,
        index,
        cfg.train.eval_split,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        rank=rank,
        world_size=world,
    )
    heldout = verification_setup(cfg, index, rank, world) if cfg.train.eval_verification else None
    accelerator.init_trackers(
        cfg.log.project,
        config=tracker_config(cfg),
        init_kwargs={
            "wandb": {"mode": cfg.log.wandb_mode, "dir": str(out), "name": cfg.log.run_name or out.name}
        },
    )
    payload = {
        "config": cfg.to_dict(),
        "config_version": CONFIG_VERSION,
        "n_mels": n_mels,
        "speaker2id": speaker2id,
        "spkdist_version": __version__,
    }
    return Job(
        cfg,
        accelerator,
        model,
        optimizer,
        schedule,
        state,
        train_batches,
        valid_loader,
        heldout,
        n_mels,
        payload,
        out,
    )


def verification_setup(cfg: Config, index: dict[str, Any], rank: int, world: int) -> Verification:
    """The held-out split's stream and trial list. Every rank draws the same (seeded) trials itself, so a
    split too small for them fails on all ranks at once instead of leaving the others waiting."""
    if not index["splits"].get(HELDOUT, {}).get("shards"):
        raise SpkdistError(
            f"{cfg.data.shards}: train.eval_verification needs a {HELDOUT} split "
            "(made by spkdist shard --heldout-speakers)"
        )
    n = cfg.train.verification_trials
    trials = make_trials(*split_speakers(cfg.data.shards, index, HELDOUT), n, n, cfg.train.seed)
    loader = eval_loader(
        cfg.data.shards,
        index,
        HELDOUT,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        rank=rank,
        world_size=world,
    )
    return Verification(loader, trials)


def tracker_config(cfg: Config) -> dict[str, Any]:
    """The run's config for the tracker: nested for W&B; flat `section.key` scalars for TensorBoard,
    whose hparams take nothing else (lists and nulls as their JSON text)."""
    if cfg.log.tracker != "tensorboard":
        return cfg.to_dict()
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            scalar = isinstance(value, (int, float, str, bool))
            flat[f"{section}.{key}"] = value if scalar else json.dumps(value)
    return flat


def fit(job: Job, stop: StopRequest) -> TrainResult:
    """Steps until train.max_steps (or an agreed stop), evaluating and checkpointing on the way."""
    accelerator, cfg, state = job.accelerator, job.cfg, job.state
    meter, health = Meter(accelerator.device), StepHealth(accelerator.device, state.skipped_steps)
    metrics: dict[str, float] = {}
    metrics_step = -1  # the step `metrics` were measured at, stored beside them in checkpoints
    if any_rank(accelerator, stop.requested):  # a signal during start-up: nothing new to save
        accelerator.print(f"{stop.reason} during start-up: stopped at step {state.step}, nothing saved")
        accelerator.end_training()
        return TrainResult(state.step, metrics, accelerator.unwrap_model(job.model), stop.reason)
    vote = StopVote(accelerator, cfg.train.collective_timeout)
    stopping = False
    head = accelerator.unwrap_model(job.model).head
    margin_schedule = isinstance(head, MarginHead) and cfg.train.margin_warmup is not None
    job.model.train()
    with tqdm(
        total=cfg.train.max_steps,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    ) as progress:

        def say(message: str) -> None:  # rank 0 only, without breaking the progress bar
            if accelerator.is_main_process:
                progress.write(message)

        while state.step < cfg.train.max_steps:
            if margin_schedule:  # a fill on the device: no host read, and no recompile of a compiled model
                head.margin_now.fill_(margin_at(cfg, state.step))
            train_step(job, meter, health)
            state.step += 1
            progress.update(1)

            stopping = vote.poll(stop.requested)
            at_end = state.step == cfg.train.max_steps
            improved = False
            logging = state.step % cfg.train.log_every == 0
            # a stopping job saves at once: a pre-emption's grace period may not cover an evaluation
            evaluating = (state.step % cfg.train.eval_every == 0 or at_end) and not stopping
            saving = state.step % cfg.train.save_every == 0 or at_end or stopping
            if logging or evaluating or saving:  # the only steps that read from the device
                state.skipped_steps = health.check(cfg.train.max_nonfinite, state.step)
            if logging:
                log = meter.flush(accelerator) | {
                    "train/lr": job.schedule.last_lr(),
                    "train/grad_norm": health.last_norm(),
                    "train/skipped_steps": state.skipped_steps,
                }
                if isinstance(head, MarginHead):
                    log |= {
                        "train/am_margin": margin_at(cfg, state.step - 1),
                        "train/am_scale": cfg.model.scale,
                    }
                accelerator.log(log, step=state.step)
                progress.set_postfix(loss=f"{log['train/loss']:.3f}", acc=f"{log['train/accuracy']:.3f}")

            if evaluating or saving:
                sync_buffers(accelerator, job.model)
            if evaluating:
                metrics, metrics_step = validate(job), state.step
                accelerator.log({f"valid/{k}": v for k, v in metrics.items()}, step=state.step)
                say(
                    f"step {state.step}: valid loss {metrics['loss']:.4f} accuracy "
                    f"{metrics['accuracy']:.4f} ({metrics['num_samples']} utterances)"
                    + (f", held-out EER {metrics['eer']:.4f}" if "eer" in metrics else "")
                )
                improved = metrics["accuracy"] > state.best_accuracy
                if improved:
                    state.best_accuracy, state.best_step = metrics["accuracy"], state.step
                    record_best(accelerator, cfg, state)
            if saving or improved:
                path = checkpoint.save(
                    accelerator,
                    job.model,
                    job.out,
                    state.step,
                    {**job.payload, "metrics": metrics, "metrics_step": metrics_step},
                    keep_last=cfg.train.keep_last,
                    is_best=improved,
                )
                say(f"saved {path}")
            if stopping:
                say(
                    f"{stop.reason}: stopped at step {state.step}, "
                    f"checkpoint in {job.out}/checkpoints; resume with the same command plus "
                    "`train.resume=latest`"
                )
                break
    vote.close()
    if accelerator.is_main_process:
        report_outputs(accelerator, cfg, job.out, state)
    accelerator.end_training()
    return TrainResult(
        state.step, metrics, accelerator.unwrap_model(job.model), stop.reason if stopping else None
    )


def margin_at(cfg: Config, step: int) -> float:
    """The margin head's margin for the step after `step` steps: model.margin, grown linearly from 0
    over train.margin_warmup when set (host arithmetic on the step count, no device read)."""
    if cfg.train.margin_warmup is None:
        return cfg.model.margin
    start, end = cfg.train.margin_warmup
    return cfg.model.margin * min(1.0, max(0.0, (step - start) / (end - start)))


def validate(job: Job) -> dict[str, float]:
    """Loss, accuracy and count over the whole validation split, every rank evaluating its share, and
    with train.eval_verification the EER and minDCF of the held-out speakers' trials.

    The unwrapped model runs, not the DDP wrapper: a DDP forward would broadcast buffers, a collective
    that a rank with no validation batch never joins (buffers were synced just before). Under ZeRO-3
    each forward gathers sharded weights from all ranks, so ranks run in lockstep there.
    """
    accelerator = job.accelerator
    model = accelerator.unwrap_model(job.model)
    zero3 = is_zero3(accelerator)
    batches = lockstep(accelerator, job.valid_loader) if zero3 else job.valid_loader
    # the dashboards' counts and embedding sample, for W&B runs (all ranks collect; rank 0 logs)
    wandb = job.cfg.log.tracker == "wandb"
    details = EvalDetails(len(job.payload["speaker2id"]), accelerator.device) if wandb else None
    metrics = evaluate(accelerator, model, batches, idle_n_mels=job.n_mels, details=details)
    results = details.reduce(accelerator) if details is not None else None  # a collective: every rank
    trials = None  # (scores, labels) of the held-out speakers' trials
    if job.heldout is not None:
        batches = lockstep(accelerator, job.heldout.loader) if zero3 else job.heldout.loader
        rows = embed(model, batches, accelerator.device, idle_n_mels=job.n_mels)
        if accelerator.num_processes > 1:
            rows = gather_object(rows)  # every rank gets all rows and scores the same trials
        embeddings = Embeddings.from_rows(rows)
        labels, enroll, test = trial_rows(embeddings, job.heldout.trials)
        trials = cosine_scores(embeddings.vectors, enroll, test), labels
        metrics |= {"eer": eer(*trials)[0], "min_dcf": min_dcf(*trials, p_target=0.01)}
    if results is not None and accelerator.is_main_process:
        id2speaker = {i: name for name, i in job.payload["speaker2id"].items()}
        try:  # pictures are worth no crash: the other ranks would wait in the next collective
            panels = evaluation_panels(results, id2speaker)
            if trials is not None:
                panels |= score_histograms(*trials)
            accelerator.get_tracker("wandb", unwrap=True).log(panels, step=job.state.step)
        except Exception as e:
            warnings.warn(f"dashboard panels not logged at step {job.state.step}: {e}", stacklevel=1)
    return metrics


def record_best(accelerator: Accelerator, cfg: Config, state: TrainState) -> None:
    """The W&B run summary holds the best validation accuracy and its step (shown in the runs table)."""
    if cfg.log.tracker == "wandb" and accelerator.is_main_process:
        summary = accelerator.get_tracker("wandb", unwrap=True).summary
        summary["valid/best_accuracy"], summary["valid/best_step"] = state.best_accuracy, state.best_step


def train_step(job: Job, meter: Meter, health: StepHealth) -> None:
    """One optimizer step over `grad_accum` micro-batches, without a host read (see the module doc)."""
    accelerator, model, optimizer = job.accelerator, job.model, job.optimizer
    max_norm = job.cfg.train.clip_grad_norm or math.inf  # inf: measure the norm, never clip
    # The forward passes update buffers (BatchNorm statistics) whatever the gradient turns out to be: keep
    # a copy (they are small) to put back if this step is skipped, or one NaN batch poisons them for good.
    buffers = list(model.buffers())
    saved_buffers = [buffer.clone() for buffer in buffers]
    for _ in range(job.cfg.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(job.train_batches).to(accelerator.device)
        meter.data_wait += time.perf_counter() - t0
        with accelerator.accumulate(model):
            logits = model(batch.mels, batch.lengths, batch.labels)  # (B, n_speakers)
            loss = F.cross_entropy(logits.float(), batch.labels)
            # always backward, even on a non-finite loss: DDP ranks must run the same collectives, and
            # the NaN reaching every rank's all-reduced gradient makes them all skip the step together
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                finite = health.update(torch.as_tensor(grad_norm, device=accelerator.device))
                skip_if_nonfinite(accelerator, optimizer, finite)
                optimizer.step()
                job.schedule.step(finite)
                optimizer.zero_grad(set_to_none=True)
                for buffer, saved in zip(buffers, saved_buffers, strict=True):
                    buffer.copy_(torch.where(finite, buffer, saved))
        meter.add(loss, logits, batch)


def skip_if_nonfinite(accelerator: Accelerator, optimizer, finite: torch.Tensor) -> None:
    """Arm the fused AdamW kernel to leave everything untouched this step unless `finite` is true.

    fp16 with a GradScaler (CUDA): the scaler hands the kernel its own overflow flag (the same verdict).
    DeepSpeed: the engine stepped inside backward already.
    """
    if accelerator.scaler is not None or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    # Fused optimizers read `found_inf` (and `grad_scale`) as attributes at step time: the mechanism
    # GradScaler uses (torch/optim/adam.py, `_fused_adam`); the NaN-step test catches a change of it.
    optimizer.optimizer.found_inf = (~finite).float()  # AcceleratedOptimizer wraps the torch optimizer


def fill_deepspeed_config(accelerator: Accelerator, cfg: Config) -> None:
    """Resolve the "auto" entries of the DeepSpeed JSON from the experiment config, so batch size, clipping
    and accumulation are set in one place and applied once (by DeepSpeed, not also by the loop)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", cfg.data.batch_size),
        ("gradient_clipping", cfg.train.clip_grad_norm),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes


def make_schedule(optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device) -> WarmupCosine:
    """The run's learning-rate schedule: warmup (in steps, or a share of train.max_steps), then cosine."""
    warmup = cfg.optim.warmup(cfg.train.max_steps)
    return WarmupCosine(optimizer, cfg.optim.lr, warmup, cfg.train.max_steps, device)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """Fused AdamW (it can skip a step on the device), weight decay on matrices only: decaying biases and
    norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=True)


def forever(loader):
    """Epoch after epoch of a loader (each epoch has the same number of batches on every rank)."""
    while True:
        yield from loader


def report_outputs(accelerator: Accelerator, cfg: Config, out: Path, state: TrainState) -> None:
    """Tell the user where the run's results are."""
    print(
        f"checkpoints: {checkpoint.checkpoint_dir(out)} (best: step {state.best_step}, "
        f"valid accuracy {state.best_accuracy:.4f}; `last` points to step {state.step})"
    )
    if cfg.log.tracker == "wandb" and cfg.log.wandb_mode == "offline":
        run_dir = Path(accelerator.get_tracker("wandb", unwrap=True).dir).parent
        print(f"W&B offline run: {run_dir} (upload later with `wandb sync {run_dir}`)")
    elif cfg.log.tracker == "tensorboard":
        print(f"TensorBoard logs: {out} (view with `tensorboard --logdir {out}`)")


class StepHealth:
    """Non-finite steps, counted on the device at every step and read back at log steps only."""

    def __init__(self, device: torch.device, skipped_steps: int) -> None:
        self.skipped = torch.tensor(skipped_steps, device=device)
        self.in_row = torch.zeros((), dtype=torch.int64, device=device)
        self.worst_in_row = torch.zeros((), dtype=torch.int64, device=device)  # since the last check
        self.grad_norm = torch.zeros((), device=device)

    def update(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Count this step's gradient norm; returns whether it is finite (a bool tensor)."""
        finite = torch.isfinite(grad_norm)
        self.grad_norm = grad_norm.detach().float()
        self.skipped += (~finite).to(torch.int64)
        self.in_row = torch.where(finite, 0, self.in_row + 1)
        self.worst_in_row = torch.maximum(self.worst_in_row, self.in_row)
        return finite

    def check(self, max_in_row: int, step: int) -> int:
        """Raise if `max_in_row` steps in a row were non-finite since the last check; the skipped total."""
        skipped, worst = self.skipped.item(), self.worst_in_row.item()
        if worst >= max_in_row:
            raise SpkdistError(
                f"{worst} steps in a row had a non-finite loss or gradient (by step {step}); "
                "lower optim.lr, enable clipping or check the data"
            )
        self.worst_in_row.copy_(self.in_row)
        return skipped

    def last_norm(self) -> float:
        return self.grad_norm.item()


class Meter:
    """Training metrics between two log points. Sums stay on the device so steps never wait on them."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)  # loss sum, correct predictions
        self._reset()

    def _reset(self) -> None:
        self.sums.zero_()
        self.micro_batches = self.utterances = self.bad_shards = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, batch: Batch) -> None:
        self.sums[0] += loss.detach()
        # with a margin head these are training logits (margin applied): a pessimistic accuracy
        self.sums[1] += (logits.detach().argmax(-1) == batch.labels).sum()
        self.micro_batches += 1
        self.utterances += len(batch)
        self.bad_shards += batch.bad_shards

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """Averages over all ranks since the last flush (a collective), then start a new window."""
        elapsed = time.perf_counter() - self.start
        counts = [self.micro_batches, self.utterances, self.bad_shards, self.data_wait / elapsed]
        local = torch.cat([self.sums, torch.tensor(counts, device=self.sums.device)])
        loss_sum, correct, micro_batches, utterances, bad_shards, wait = accelerator.reduce(
            local, reduction="sum"
        ).tolist()
        self._reset()
        return {
            "train/loss": loss_sum / micro_batches,
            "train/accuracy": correct / utterances,
            "train/utts_per_s": utterances / elapsed,
            "train/data_wait_fraction": wait / accelerator.num_processes,
            "train/bad_shards": int(bad_shards),
        }


DESCRIPTION = "Train a speaker-identification model from spkdist shards."
EXAMPLE = (
    "Example: accelerate launch -m spkdist.train --config boss.yaml data.shards=shards/fsdd-demo "
    "train.max_steps=300   (or: spkdist train ..., python launch/train.py ...)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="experiment YAML; a bare name like boss.yaml is one of the shipped configs (`spkdist configs`)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override any config field, e.g. train.max_steps=300 model.d_model=128",
    )


def add_command(commands) -> None:
    """`spkdist train`: the same as launch/train.py and `python -m spkdist.train`."""
    p = commands.add_parser(
        "train", help=DESCRIPTION.lower().rstrip("."), description=DESCRIPTION, epilog=EXAMPLE
    )
    add_arguments(p)
    p.set_defaults(run=lambda args: _train(args.config, args.overrides))


def _train(config: str, overrides: list[str]) -> None:
    run(load_config(config, overrides))


def main(argv: list[str] | None = None) -> int:
    """launch/train.py and `python -m spkdist.train`."""
    parser = argparse.ArgumentParser(prog="spkdist.train", description=DESCRIPTION, epilog=EXAMPLE)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_code(lambda: _train(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
