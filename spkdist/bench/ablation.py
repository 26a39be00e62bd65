"""The boss levers one at a time: the recipe as configured, then each lever it turns on switched back off.

Trains configs/boss.yaml (or --recipe) for --steps steps, then once per lever the recipe uses, with only
that lever returned to its neutral setting (the homework's boss where there is one: self-attention
pooling, AM-softmax), and reports the best valid accuracy of each run: a lever is worth its place when
turning it off costs accuracy. Valid only: the test split is for the final table (`spkdist bench
recipes`), never for choosing levers. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import nonnegative_int, positive_int
from ..config import RECIPES, Config, load_config
from .recipes import train_and_test, work_dir

EXAMPLE = "spkdist bench ablation --shards shards/hard --steps 1000"

# lever -> (is it on in this config?, the overrides that turn it off)
LEVERS = {
    "feature_norm": (lambda c: c.model.feature_norm != "none", ["model.feature_norm=none"]),
    "conv_frontend": (lambda c: c.model.frontend == "conv2d", ["model.frontend=linear"]),
    "spec_augment": (
        lambda c: c.data.time_masks > 0 or c.data.freq_masks > 0,
        ["data.time_masks=0", "data.freq_masks=0"],
    ),
    "noise": (lambda c: c.data.noise_prob > 0, ["data.noise_prob=0"]),
    "attentive_stats_pooling": (lambda c: c.model.pooling == "attentive_stats", ["model.pooling=attention"]),
    "layer_aggregation": (lambda c: c.model.layer_aggregation == "concat", ["model.layer_aggregation=last"]),
    "aam_softmax": (lambda c: c.model.head == "aam_softmax", ["model.head=am_softmax"]),
    "margin_warmup": (lambda c: c.train.margin_warmup is not None, ["train.margin_warmup=null"]),
}


def levers_on(cfg: Config) -> dict[str, list[str]]:
    """The levers `cfg` turns on, each with the overrides that turn it off."""
    return {name: off for name, (on, off) in LEVERS.items() if on(cfg)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="a labeled shard directory with train and valid")
    parser.add_argument("--recipe", default="boss", choices=RECIPES, help="the recipe to ablate")
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps per run")
    parser.add_argument("--workers", type=nonnegative_int, default=2, help="data loader workers")
    parser.add_argument(
        "--dir",
        default=None,
        help="keep the runs here, DIR/0 (as configured), DIR/1, ... in the report's order; "
        "default: a temporary directory, deleted at the end",
    )


def run(args: argparse.Namespace) -> dict:
    variants = {"as configured": []} | {
        f"without {name}": off for name, off in levers_on(load_config(f"{args.recipe}.yaml")).items()
    }
    results = []
    with work_dir(args.dir) as tmp:
        for number, (label, off) in enumerate(variants.items()):
            result = train_and_test(
                args.recipe,
                Path(args.shards),
                Path(tmp) / str(number),
                args.steps,
                args.workers,
                off,
                label,
                splits=("valid",),
            )
            results.append({"variant": label, **result})
    for result in results[:-1]:
        print(json.dumps(result))
    return results[-1]
