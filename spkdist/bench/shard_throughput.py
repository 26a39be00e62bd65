"""Sharding throughput on a synthetic HW4-shaped directory, compared with `tar cf` of the same files.

Generates the directory (600 speakers, HW4's utterance counts times --scale, lengths spread like the real
set), then times, alternately and --repeats times each, `tar cf` of it and sharding it with the same code
`spkdist shard` runs (in this process, so without the command's ~1-2 s of interpreter and import
start-up); the fastest of each counts, since load from other processes only ever slows a run down.
Checks the shards with `verify` and reports utterances/s and input MB/s of the shard run and its time
relative to tar (goal: <= 2.0 with 2 workers). Dirty pages are flushed (sync) before each timed step;
both steps read the freshly generated files from the page cache and write their output next to them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..argtypes import positive_int
from ..errors import BadInput, SpkdistError
from ..shard_format import verify
from ..shard_run import ShardOptions, shard
from ..sources import read_hw4
from .synth import make_hw4_dir

EXAMPLE = "spkdist bench shard --scale 0.25"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of HW4's 64,666 utterances")
    parser.add_argument("--workers", type=positive_int, default=2, help="shard worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the shard run")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="alternating timings of tar and shard; the fastest count",
    )
    parser.add_argument(
        "--dir", type=Path, help="where to put the temporary data (default: the system temp directory)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale <= 0 or args.repeats < 1:
        raise SpkdistError("--scale must be positive and --repeats at least 1")
    with tempfile.TemporaryDirectory(prefix="spkdist-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        hw4 = make_hw4_dir(work / "hw4", scale=args.scale, seed=args.seed)
        files = [p for p in hw4.iterdir() if p.suffix == ".pt"]
        input_mb = sum(p.stat().st_size for p in hw4.iterdir()) / 1e6
        print(
            f"generated {len(files):,} .pt files, {input_mb:,.1f} MB in {time.perf_counter() - started:.1f} s"
        )

        def tar() -> None:
            subprocess.run(["tar", "cf", str(work / "hw4.tar"), "-C", tmp, "hw4"], check=True)

        options = ShardOptions(workers=args.workers, seed=args.seed)  # with its progress bar, as users see it

        def shard_hw4() -> None:  # what `spkdist shard HW4DIR --out DIR --workers N` runs
            bad = BadInput(skip=False)
            corpus = read_hw4(hw4, bad)
            shard(corpus, corpus.precomputed, work / "shards", options, bad)

        tar_runs, shard_runs = [], []
        for _ in range(args.repeats):  # alternating, so that a burst of load elsewhere hits both
            tar_runs.append(_timed(tar))
            (work / "hw4.tar").unlink()
            shutil.rmtree(work / "shards", ignore_errors=True)  # untimed, like deleting tar's output
            shard_runs.append(_timed(shard_hw4))
            print(
                f"tar cf: {tar_runs[-1]:.2f} s, spkdist shard, {args.workers} workers: {shard_runs[-1]:.2f} s"
            )
        problems = verify(work / "shards")
        if problems:
            raise SpkdistError(f"the benchmark's shards fail verification: {problems[0]}")
        output_mb = sum(p.stat().st_size for p in (work / "shards").iterdir()) / 1e6
    tar_s, shard_s = min(tar_runs), min(shard_runs)  # noise from other processes only ever slows a run down
    print(f"fastest: tar cf {tar_s:.2f} s, spkdist shard {shard_s:.2f} s ({shard_s / tar_s:.2f}x)")
    return {
        "bench": "shard",
        "scale": args.scale,
        "workers": args.workers,
        "repeats": args.repeats,
        "utterances": len(files),
        "input_mb": round(input_mb, 1),
        "output_mb": round(output_mb, 1),
        "tar_s": round(tar_s, 3),
        "shard_s": round(shard_s, 3),
        "utts_per_s": round(len(files) / shard_s, 1),
        "mb_per_s": round(input_mb / shard_s, 1),
        "ratio_to_tar": round(shard_s / tar_s, 3),
    }


def _timed(step: Callable[[], object]) -> float:
    os.sync()  # so that writing back earlier data does not land in the timed step
    started = time.perf_counter()
    step()
    return time.perf_counter() - started
