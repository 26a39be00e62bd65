"""Test accuracy and training time of the four recipes on the embedded FSDD demo or on given shards.

By default shards the FSDD demo (real speech, 6 speakers; FSDD's own split: takes 0-4 are test); with
`--shards DIR` uses a labeled shard set built by `spkdist shard` instead (for example the hard synthetic
speakers, on which the recipes differ far more than on FSDD). Trains each recipe's full architecture from
configs/<name>.yaml for --steps steps (warmup 10% of them, everything else as in the file) with
`python -m spkdist.train` in a subprocess on this machine, and evaluates the best checkpoint (chosen on
valid) on the test split. Prints one JSON line per recipe: recipe, test_accuracy, train_seconds, steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..argtypes import nonnegative_int, positive_int
from ..config import RECIPES
from ..errors import SpkdistError, child_error
from ..infer import run_evaluate
from ..shard_format import load_index, shard_urls

EXAMPLE = "spkdist bench recipes --shards shards/hard --steps 3000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=list(RECIPES),
        choices=RECIPES,
        help="recipes to train (configs/<name>.yaml)",
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps per recipe")
    parser.add_argument("--workers", type=nonnegative_int, default=2, help="data loader workers")
    parser.add_argument(
        "--shards",
        default=None,
        help="a labeled shard directory with train, valid and test splits (default: shard the FSDD demo)",
    )
    parser.add_argument("--dir", default=None, help="where shards and runs go (default: a temp directory)")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.shards is None:
            shards = Path(tmp) / "fsdd"
            command = [sys.executable, "-m", "spkdist.cli", "shard", "--demo", "--out", str(shards)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        else:
            shards = Path(args.shards)
            index = load_index(shards)
            for split in ("train", "valid", "test"):
                shard_urls(shards, index, split)  # a one-line error now rather than after training
            if index["source"]["format"] == "hw4":
                raise SpkdistError(
                    f"{shards}: the test split of an HW4 directory is unlabeled; nothing to score"
                )
        results = [train_and_test(name, shards, Path(tmp) / name, args) for name in args.recipes]
    for result in results[:-1]:
        print(json.dumps(result))
    return results[-1]


def train_and_test(name: str, shards: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={args.steps}",
        "optim.warmup_steps=null",
        "optim.warmup_fraction=0.1",
        f"train.eval_every={max(1, args.steps // 3)}",
        f"train.save_every={args.steps}",
        f"data.num_workers={args.workers}",
        "log.tracker=none",
    ]
    start = time.perf_counter()
    trained = subprocess.run(
        [sys.executable, "-m", "spkdist.train", "--config", f"{name}.yaml", *overrides],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if trained.returncode != 0:
        raise SpkdistError(f"training {name} failed: {child_error(trained.stderr)}")
    metrics = run_evaluate(str(run_dir), str(shards), "test", batch_size=64, num_workers=args.workers)
    result = {
        "recipe": name,
        "test_accuracy": round(metrics["accuracy"], 4),
        "train_seconds": round(seconds, 1),
        "steps": args.steps,
    }
    print(
        f"{name}: test accuracy {result['test_accuracy']:.4f} on {metrics['num_samples']} utterances, "
        f"trained {args.steps} steps in {seconds:.0f} s",
        flush=True,
    )
    return result
