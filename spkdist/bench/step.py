"""Optimizer-step time of our Accelerate training step against a bare PyTorch loop, per model.

Both loops train the same recipe model (from configs/<name>.yaml) on the same in-memory batches, one
process, on the CPU or the one GPU this machine has:

    bare  forward, cross-entropy, backward, clip_grad_norm_, AdamW step, LambdaLR step, zero_grad
    ours  `spkdist.train.train_step`: the exact step the trainer runs (Accelerate-prepared model and
          optimizer, the device-side schedule, `accumulate`, clipping, the on-device non-finite skip,
          the metric meter)

The two loops alternate --repeats times (--steps timed steps each, after --warmup untimed ones) and the
fastest repeat of each is reported: other processes on the machine only ever slow a repeat down, and
alternating keeps a slow moment from landing on one side only. Prints one
JSON line per model: model, ours_s_per_step, bare_s_per_step, ratio. Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..argtypes import nonnegative_int, positive_int
from ..config import RECIPES, load_config
from ..distributed import DEFAULT_COLLECTIVE_TIMEOUT, make_accelerator
from ..models import build_model
from ..stream import Batch
from ..train import Job, Meter, StepHealth, TrainState, make_optimizer, make_schedule, train_step

N_SPEAKERS, N_MELS = 600, 40  # HW4-shaped

EXAMPLE = "spkdist bench step --models sample boss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(RECIPES),
        choices=RECIPES,
        help="recipes to time (configs/<name>.yaml)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="utterances per batch")
    parser.add_argument("--segment-len", type=positive_int, default=128, help="frames per utterance")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps before each timing")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating timings of each loop")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])


def make_batches(n: int, batch_size: int, segment_len: int, device: torch.device) -> list[Batch]:
    """`n` random full-length batches, already on `device` (no data loading in either loop)."""
    generator = torch.Generator().manual_seed(0)
    return [
        Batch(
            mels=torch.randn(batch_size, segment_len, N_MELS, generator=generator).to(device),
            lengths=torch.full((batch_size,), segment_len, device=device),
            labels=torch.randint(0, N_SPEAKERS, (batch_size,), generator=generator).to(device),
            keys=[""] * batch_size,
            speakers=[None] * batch_size,
            sources=[""] * batch_size,
            orders=list(range(batch_size)),
        )
        for _ in range(n)
    ]


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `step()`, after `warmup` untimed calls; waits for the device at both ends."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bare_loop(cfg, batches: list[Batch], device: torch.device, precision: str, compiled: bool = False):
    """The homework-style loop: nothing between the model and the optimizer (`compiled`: torch.compile)."""
    model = build_model(cfg.model, N_MELS, N_SPEAKERS).to(device).train()
    if compiled:
        model.compile(mode=cfg.train.compile_mode)
    optimizer = make_optimizer(model, cfg)
    warmup = max(1, cfg.optim.warmup(cfg.train.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / warmup))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    max_norm = cfg.train.clip_grad_norm or math.inf  # 0 means "never clip", as in the trainer
    position = 0

    def step() -> None:
        nonlocal position
        batch = batches[position % len(batches)]
        position += 1
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch.mels, batch.lengths, batch.labels)
        loss = F.cross_entropy(logits.float(), batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_loop(cfg, batches: list[Batch], accelerator: Accelerator):
    """`train_step` exactly as `spkdist.train.fit` calls it (a Job holding only what a step uses)."""
    model = build_model(cfg.model, N_MELS, N_SPEAKERS)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg))
    schedule = make_schedule(optimizer, cfg, accelerator.device)
    model.train()
    job = Job(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        state=TrainState(),
        train_batches=itertools.cycle(batches),
        valid_loader=None,
        heldout=None,
        n_mels=N_MELS,
        payload={},
        out=Path("."),
    )
    meter, health = Meter(accelerator.device), StepHealth(accelerator.device, 0)
    return lambda: train_step(job, meter, health)


def run(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(DEFAULT_COLLECTIVE_TIMEOUT, mixed_precision=args.mixed_precision)
    device = accelerator.device
    print(
        f"device {device}, batch {args.batch_size} x {args.segment_len} frames, "
        f"mixed precision {args.mixed_precision}, threads {torch.get_num_threads()}"
    )
    batches = make_batches(8, args.batch_size, args.segment_len, device)
    results = []
    for name in args.models:
        cfg = load_config(f"{name}.yaml")
        bare, ours = (
            bare_loop(cfg, batches, device, args.mixed_precision),
            our_loop(cfg, batches, accelerator),
        )
        bare_times, our_times = [], []
        for _ in range(args.repeats):
            bare_times.append(time_steps(bare, args.steps, args.warmup, device))
            our_times.append(time_steps(ours, args.steps, args.warmup, device))
        result = {
            "model": name,
            "ours_s_per_step": round(min(our_times), 5),
            "bare_s_per_step": round(min(bare_times), 5),
        }
        result["ratio"] = round(result["ours_s_per_step"] / result["bare_s_per_step"], 3)
        print(
            f"{name}: ours {result['ours_s_per_step']:.4f} s/step, bare {result['bare_s_per_step']:.4f} "
            f"s/step, ratio {result['ratio']:.3f}"
        )
        results.append(result)
    for result in results[:-1]:
        print(json.dumps(result))
    return results[-1]  # printed as the final JSON line by `spkdist bench`
