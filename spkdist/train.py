"""The training job: config -> Accelerator -> model, optimizer, schedule -> steps, evaluation, checkpoints.

Run with `accelerate launch launch/train.py --config configs/boss.yaml [section.key=value ...]` on any
number of processes, or as plain `python launch/train.py ...` for one CPU or GPU process. `run` is the
whole story and reads top to bottom.

The data loaders are deliberately not passed through `accelerator.prepare`: the shard streams already split
the data by rank and worker (and give every rank the same number of training batches), whereas a prepared
IterableDataset would be re-dispatched from rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from . import __version__, checkpoint
from .config import Config, dump_config, load_config
from .errors import SpkdistError
from .evaluation import any_rank, evaluate
from .fsutil import atomic_write_bytes
from .models import build_model
from .shards import load_index
from .stream import eval_loader, train_loader


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


class StopRequest:
    """Turns SIGTERM/SIGINT (a pre-empted job, Ctrl-C) into a request to checkpoint and exit cleanly.

    A second SIGINT interrupts at once, for the impatient.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank got a signal, so all ranks stop at the same step."""
        return any_rank(accelerator, self.signal_name is not None)


def deepspeed_launch() -> bool:
    """True under a DeepSpeed `accelerate launch`; then check what Accelerate's DeepSpeed path needs.

    That path reads the `transformers` package metadata even without a transformers model: say how to
    fix it instead of failing deep inside Accelerate with PackageNotFoundError.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise SpkdistError(
            f"DeepSpeed launch, but {' and '.join(missing)} not installed: pip install -e '.[deepspeed]' "
            "(Accelerate's DeepSpeed integration needs the transformers package even though spkdist uses no "
            "transformers model)"
        )
    return True


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


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the launcher started N processes but they did not join one world of N."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise SpkdistError(
            f"launched {launched} processes but Accelerate formed a world of {accelerator.num_processes}; "
            "check the accelerate launch flags (on CPU-only machines use --multi_gpu, not --cpu)"
        )


def warmup_cosine(warmup_steps: int, max_steps: int):
    """LR factor: linear warmup from 0 to 1, then cosine decay to 0 at `max_steps` (the homework recipe)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying biases and norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def forever(loader):
    """Epoch after epoch of a loader (each epoch has the same number of batches on every rank)."""
    while True:
        yield from loader


def run(cfg: Config) -> TrainResult:
    """Train as `cfg` says; return the final step, validation metrics and (unwrapped) model."""
    out = Path(cfg.train.output_dir)
    if not cfg.train.resume and checkpoint.step_checkpoints(checkpoint.checkpoint_dir(out)):
        raise SpkdistError(
            f"{out}: holds checkpoints of an earlier run; continue it with train.resume=latest "
            "or choose another train.output_dir"
        )
    use_deepspeed, on_cpu = deepspeed_launch(), not torch.cuda.is_available()
    # a rank that dies or a node that never joins fails the job after this, instead of a silent hang
    process_group = {"timeout": timedelta(seconds=cfg.train.collective_timeout)}
    if use_deepspeed and on_cpu:
        # DeepSpeed on CPU: name gloo, or Accelerate sees no backend and reports a world of 1 on every rank
        process_group["backend"] = "gloo"
    accelerator = Accelerator(
        # Without a GPU, DDP must be told it runs on CPU: only then does a multi-process launch form one
        # gloo world (otherwise Accelerate quietly gives each process a world of its own). DeepSpeed must
        # not be: cpu=True silently swaps it for plain DDP.
        cpu=on_cpu and not use_deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=str(out),
        # the schedule counts optimizer steps; by default Accelerate would step it once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(**process_group)],
    )
    accelerator.print(
        f"spkdist {__version__}: {accelerator.num_processes} process(es), "
        f"{accelerator.distributed_type.value}, {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )
    accelerator.print(dump_config(cfg), end="")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", dump_config(cfg).encode())

    index = load_index(cfg.data.shards)
    n_mels, speaker2id = index["n_mels"], index["speaker2id"]
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, n_mels=n_mels, n_speakers=len(speaker2id))
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.train.max_steps)
    )
    fill_deepspeed_config(accelerator, cfg)
    zero3 = use_deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    resume_dir = checkpoint.find_resume_dir(out, cfg.train.resume) if cfg.train.resume else None
    if resume_dir is not None:
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

    accelerator.init_trackers(
        cfg.log.project,
        config=cfg.to_dict(),
        init_kwargs={
            "wandb": {"mode": cfg.log.wandb_mode, "dir": str(out), "name": cfg.log.run_name or out.name}
        },
    )
    payload = {
        "config": cfg.to_dict(),
        "n_mels": n_mels,
        "speaker2id": speaker2id,
        "spkdist_version": __version__,
    }
    stop = StopRequest()
    meter = Meter(accelerator.device, world)
    metrics: dict[str, float] = {}
    nonfinite_in_row = 0
    max_norm = cfg.train.clip_grad_norm or math.inf  # inf: measure the norm, never clip
    model.train()
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
            grad_norm = train_step(
                accelerator, model, optimizer, scheduler, train_batches, meter, cfg.train.grad_accum, max_norm
            )
            state.step += 1
            progress.update(1)
            if math.isfinite(grad_norm):
                nonfinite_in_row = 0
            else:
                state.skipped_steps += 1
                nonfinite_in_row += 1
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    raise SpkdistError(
                        f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{state.step}); lower optim.lr, enable clipping or check the data"
                    )

            if state.step % cfg.train.log_every == 0:
                log = meter.flush() | {
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm,
                    "train/skipped_steps": state.skipped_steps,
                }
                if cfg.model.head == "am_softmax":
                    log |= {"train/am_margin": cfg.model.margin, "train/am_scale": cfg.model.scale}
                accelerator.log(log, step=state.step)
                progress.set_postfix(loss=f"{log['train/loss']:.3f}", acc=f"{log['train/accuracy']:.3f}")

            stopping = stop.agreed(accelerator)
            at_end = state.step == cfg.train.max_steps
            improved = False
            evaluating = state.step % cfg.train.eval_every == 0 or at_end
            saving = state.step % cfg.train.save_every == 0 or at_end or stopping
            if evaluating or saving:
                average_buffers(accelerator, model)
            if evaluating:
                metrics = evaluate(
                    accelerator, model, valid_loader, lockstep_n_mels=n_mels if zero3 else None
                )
                accelerator.log({f"valid/{k}": v for k, v in metrics.items()}, step=state.step)
                say(
                    f"step {state.step}: valid loss {metrics['loss']:.4f} accuracy "
                    f"{metrics['accuracy']:.4f} ({metrics['num_samples']} utterances)"
                )
                improved = metrics["accuracy"] > state.best_accuracy
                if improved:
                    state.best_accuracy, state.best_step = metrics["accuracy"], state.step
            if saving or improved:
                path = checkpoint.save(
                    accelerator,
                    model,
                    out,
                    state.step,
                    {**payload, "metrics": metrics},
                    keep_last=cfg.train.keep_last,
                    is_best=improved,
                )
                say(f"saved {path}")
            if stopping:
                say(
                    f"{stop.signal_name}: stopped at step {state.step}, checkpoint in {out}/checkpoints; "
                    f"resume with the same command plus `train.resume=latest`"
                )
                break
    if accelerator.is_main_process:
        report_outputs(accelerator, cfg, out, state)
    accelerator.end_training()
    return TrainResult(state.step, metrics, accelerator.unwrap_model(model), stop.signal_name)


def average_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Make every rank hold the same buffers before evaluating or saving.

    DDP broadcasts buffers from rank 0 at each forward; DeepSpeed does not, so the Conformer's BatchNorm
    running statistics drift apart between ranks. Averaging them gives every rank, and the checkpoint,
    one model (and the statistics of all ranks' data).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer, reduction="mean"))


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


def train_step(
    accelerator, model, optimizer, scheduler, batches, meter: Meter, grad_accum: int, max_norm: float
) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the gradient norm (non-finite: skipped)."""
    for _ in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches).to(accelerator.device)
        meter.data_wait += time.perf_counter() - t0
        with accelerator.accumulate(model):
            logits = model(batch.mels, batch.lengths, batch.labels)  # (B, n_speakers)
            loss = F.cross_entropy(logits.float(), batch.labels)
            # always backward, even on a non-finite loss: DDP ranks must run the same collectives, and
            # the NaN reaching every rank's all-reduced gradient makes them all skip the step together
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                # fp16: the grad scaler must see overflows to lower its scale, so it decides itself
                if math.isfinite(grad_norm) or accelerator.mixed_precision == "fp16":
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        meter.add(loss, logits, batch)
    return grad_norm


class Meter:
    """Training metrics between two log points. Sums stay on the device so steps never wait on them."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.micro_batches = self.utterances = self.bad_shards = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, batch) -> None:
        self.loss_sum += loss.detach()
        # with a margin head these are training logits (margin applied): a pessimistic accuracy
        self.correct += (logits.detach().argmax(-1) == batch.labels).sum()
        self.micro_batches += 1
        self.utterances += len(batch)
        self.bad_shards += batch.bad_shards

    def flush(self) -> dict[str, float]:
        """This rank's averages since the last flush, then start a new window."""
        elapsed = time.perf_counter() - self.start
        log = {
            "train/loss": self.loss_sum.item() / self.micro_batches,
            "train/accuracy": self.correct.item() / self.utterances,
            "train/utts_per_s": self.utterances * self.world_size / elapsed,
            "train/data_wait_fraction": self.data_wait / elapsed,
            "train/bad_shards": self.bad_shards,
        }
        self._reset()
        return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a speaker-identification model from spkdist shards.",
        epilog="Example: accelerate launch launch/train.py --config configs/boss.yaml "
        "data.shards=shards/fsdd-demo train.max_steps=300",
    )
    parser.add_argument(
        "--config", required=True, help="experiment YAML; a bare name like boss.yaml is looked up in configs/"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override any config field, e.g. train.max_steps=300 model.d_model=128",
    )
    args = parser.parse_args(argv)
    try:
        run(load_config(args.config, args.overrides))
    except SpkdistError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    return 0
