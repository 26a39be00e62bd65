"""`spkdist bench <name>`: benchmarks anyone can rerun. Each prints a human report, then one JSON line.

A benchmark is a module with a docstring (its first line is the help text), an EXAMPLE command line,
`add_arguments(parser)` and `run(args) -> dict` (the result, printed as the final JSON line). Register it
in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from types import ModuleType

from ..errors import SpkdistError
from . import ablation, baseline, gpu, loader, recipes, shard_throughput, step

BENCHMARKS: dict[str, ModuleType] = {
    "shard": shard_throughput,
    "loader": loader,
    "step": step,
    "recipes": recipes,
    "ablation": ablation,
    "baseline": baseline,
    "gpu": gpu,
}


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `spkdist bench` and one sub-command per benchmark."""
    parser = commands.add_parser("bench", help="run a benchmark", description=__doc__.split("\n\n")[0])
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module in BENCHMARKS.items():
        sub = benchmarks.add_parser(
            name,
            help=module.__doc__.split("\n", 1)[0],
            description=module.__doc__,
            epilog=f"Example: {module.EXAMPLE}",
        )
        module.add_arguments(sub)
        sub.set_defaults(run=partial(_run, module))


def _run(module: ModuleType, args: argparse.Namespace) -> None:
    if getattr(args, "dir", None) is not None:  # every benchmark's --dir; made if missing
        try:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = f"cannot be the benchmark's directory ({error.strerror})"
            raise SpkdistError(f"{args.dir}: {problem}") from None
    print(json.dumps(module.run(args)))
