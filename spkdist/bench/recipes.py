"""Test accuracy and training time of the four recipes on the embedded FSDD demo or on given shards.

By default shards the FSDD demo (real speech, 6 speakers; FSDD's own split: takes 0-4 are test); with
`--shards DIR` uses a labeled shard set built by `spkdist shard` instead (for example the hard synthetic
speakers, on which the recipes differ far more than on FSDD). Trains each recipe's full architecture from
configs/<name>.yaml for --steps steps (everything else as in the file; `--set` overrides more) with
`python -m spkdist.train` in a subprocess on this machine, and evaluates the best checkpoint (chosen on
valid) on the test split. Prints one JSON line per recipe: recipe, test_accuracy, valid_accuracy,
train_seconds, steps.
"""

from __future__ import annotations

import argparse
import contextlib
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
from .child import run_live

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
    parser.add_argument(
        "--dir",
        default=None,
        help="keep the runs here, one directory per recipe (and the demo's shards in DIR/fsdd); "
        "default: a temporary directory, deleted at the end",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every recipe (e.g. train.seed=1)",
    )


def run(args: argparse.Namespace) -> dict:
    with work_dir(args.dir) as tmp:
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
        results = [
            train_and_test(name, shards, Path(tmp) / name, args.steps, args.workers, args.set)
            for name in args.recipes
        ]
    for result in results[:-1]:
        print(json.dumps(result))
    return results[-1]


def work_dir(directory: str | None) -> contextlib.AbstractContextManager[str]:
    """`directory`, kept afterwards so that its checkpoints can be averaged, ensembled or evaluated
    again (`bench` made it), or a temporary directory deleted at the end."""
    if directory is None:
        return tempfile.TemporaryDirectory()
    return contextlib.nullcontext(directory)


def train_and_test(
    name: str,
    shards: Path,
    run_dir: Path,
    steps: int,
    workers: int,
    overrides: list[str],
    label: str = "",
    splits: tuple[str, ...] = ("valid", "test"),
) -> dict:
    """Train configs/`name`.yaml (plus `overrides`) for `steps` steps; the best-on-valid checkpoint's
    accuracy on `splits`, and the training time."""
    overrides = [
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.eval_every={max(1, steps // 4)}",
        f"train.save_every={steps}",
        f"data.num_workers={workers}",
        "log.tracker=none",
        *overrides,
    ]
    start = time.perf_counter()
    returncode, output = run_live(
        [sys.executable, "-m", "spkdist.train", "--config", f"{name}.yaml", *overrides]
    )
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise SpkdistError(f"training {label or name} failed: {child_error(output)}")
    accuracy = {
        split: run_evaluate(str(run_dir), str(shards), split, batch_size=64, num_workers=workers)["accuracy"]
        for split in splits
    }
    result = {
        "recipe": label or name,
        **{f"{split}_accuracy": round(value, 4) for split, value in accuracy.items()},
        "train_seconds": round(seconds, 1),
        "steps": steps,
    }
    measured = ", ".join(f"{split} accuracy {value:.4f}" for split, value in accuracy.items())
    print(f"{label or name}: {measured}, trained {steps} steps in {seconds:.0f} s", flush=True)
    return result
