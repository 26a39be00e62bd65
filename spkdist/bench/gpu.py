"""Training throughput on this machine's GPU (or CPU): our loop against a bare PyTorch loop, per precision.

For each setting of --configs (fp32, bf16, bf16+compile), in a fresh process of its own (Accelerate
takes one mixed-precision setting per process), times two loops of the same model (configs/MODEL.yaml):

    ours  `spkdist.train.train_step` exactly as the trainer runs it, fed by the real shard stream
          (`train_loader`, --workers workers) over a synthetic HW4-shaped shard set
    bare  forward under autocast, cross-entropy, backward, clipping, AdamW, zero_grad, on batches that
          already sit on the device (no data loading at all), compiled too where the setting says so

After --warmup untimed steps (compilation, worker start-up), --steps steps are timed between device
syncs. Reported per setting: steps/s and utterances/s of both, ours/bare time ratio, peak device memory
of each (CUDA only), the share of our loop's time spent waiting for data, and the projected time of the
homework schedule (--schedule-steps, 70,000) at our speed (training steps only: evaluation and
checkpoints come on top). One JSON line per setting.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import train
from ..argtypes import nonnegative_int, positive_int
from ..config import RECIPES, load_config
from ..errors import SpkdistError, child_error
from .step import bare_loop, make_batches, time_steps
from .synth import make_hw4_shards

SETTINGS = {"fp32": ("no", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}

EXAMPLE = "spkdist bench gpu --configs fp32 bf16 bf16+compile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="boss", choices=RECIPES, help="recipe (configs/NAME.yaml)")
    parser.add_argument(
        "--configs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to time"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="utterances per batch")
    parser.add_argument("--segment-len", type=positive_int, default=128, help="frames per training crop")
    parser.add_argument("--steps", type=positive_int, default=100, help="timed steps of each loop")
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=20, help="untimed steps first (compilation included)"
    )
    parser.add_argument("--workers", type=nonnegative_int, default=4, help="data loader workers of our loop")
    parser.add_argument(
        "--scale", type=float, default=0.1, help="size of the synthetic set, as a share of HW4"
    )
    parser.add_argument(
        "--schedule-steps", type=positive_int, default=70_000, help="steps of the projected schedule"
    )
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)  # set for the per-setting process
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if min(args.steps, args.batch_size, args.segment_len) < 1 or args.warmup < 0:
        raise SpkdistError("--steps, --batch-size and --segment-len must be positive, --warmup >= 0")
    if args.setting is not None:  # the child process: one setting
        return measure(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{args.model}, batch {args.batch_size} x {args.segment_len} frames, on {name}")
    with tempfile.TemporaryDirectory(prefix="spkdist-bench-gpu-") as tmp:
        _, shards = make_hw4_shards(Path(tmp), scale=args.scale, seed=0, workers=args.workers, shard_mb=256)
        results = [_measure_in_child(setting, shards, args) for setting in args.configs]
    for result in results[:-1]:
        print(json.dumps(result))
    return results[-1]


def _measure_in_child(setting: str, shards: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "spkdist.cli",
        "bench",
        "gpu",
        "--setting",
        setting,
        "--shards",
        str(shards),
    ]
    for option in ("model", "batch_size", "segment_len", "steps", "warmup", "workers", "schedule_steps"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise SpkdistError(f"bench gpu {setting} failed: {child_error(child.stderr)}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"{setting}: ours {result['ours_steps_per_s']:.2f} steps/s ({result['ours_utts_per_s']:.0f} utts/s), "
        f"bare {result['bare_steps_per_s']:.2f} steps/s, ours/bare time {result['ours_over_bare']:.3f}, "
        f"peak memory ours {result['ours_peak_gib']} / bare {result['bare_peak_gib']} GiB, data wait "
        f"{result['data_wait_fraction']:.3f}, {args.schedule_steps:,} steps in "
        f"{result['schedule_hours']:.2f} h",
        flush=True,
    )
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time both loops for `args.setting` in this process."""
    precision, compiled = SETTINGS[args.setting]
    with tempfile.TemporaryDirectory(prefix="spkdist-bench-run-") as out:
        overrides = [
            f"data.shards={args.shards}",
            f"data.batch_size={args.batch_size}",
            f"data.segment_len={args.segment_len}",
            f"data.num_workers={args.workers}",
            f"train.mixed_precision={precision}",
            f"train.compile={str(compiled).lower()}",
            f"train.max_steps={args.schedule_steps}",
            f"train.output_dir={out}",
            "log.tracker=none",
        ]
        cfg = load_config(f"{args.model}.yaml", overrides)
        ours, ours_peak, wait_fraction, device = _time_our_loop(cfg, args)
        gc.collect()  # our loop's model, optimizer and loader are gone before the bare loop's peak
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batches = make_batches(8, args.batch_size, args.segment_len, device)
        bare_step = bare_loop(cfg, batches, device, precision, compiled)
        _reset_peak(device)
        bare = time_steps(bare_step, args.steps, args.warmup, device)
        bare_peak = _peak_gib(device)
    utterances = args.batch_size
    return {
        "setting": args.setting,
        "model": args.model,
        "device": str(device),
        "ours_steps_per_s": round(1 / ours, 3),
        "ours_utts_per_s": round(utterances / ours, 1),
        "bare_steps_per_s": round(1 / bare, 3),
        "bare_utts_per_s": round(utterances / bare, 1),
        "ours_over_bare": round(ours / bare, 3),
        "ours_peak_gib": ours_peak,
        "bare_peak_gib": bare_peak,
        "data_wait_fraction": round(wait_fraction, 4),
        "schedule_hours": round(ours * args.schedule_steps / 3600, 2),
    }


def _time_our_loop(cfg, args: argparse.Namespace) -> tuple[float, float | None, float, torch.device]:
    """Seconds per `train_step`, peak memory (GiB, CUDA), data-wait share over a second timed stretch."""
    job = train.setup(cfg)
    device = job.accelerator.device
    meter, health = train.Meter(device), train.StepHealth(device, 0)
    job.model.train()

    def step() -> None:
        train.train_step(job, meter, health)

    _reset_peak(device)
    seconds = time_steps(step, args.steps, args.warmup, device)
    peak = _peak_gib(device)
    meter.flush(job.accelerator)  # a fresh window: data wait over timed steps only
    time_steps(step, args.steps, 0, device)
    wait_fraction = meter.data_wait / (time.perf_counter() - meter.start)
    return seconds, peak, wait_fraction, device


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None
