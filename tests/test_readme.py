"""The README's commands run as written: each cheap one is run here, made quick by options appended after
it (a later option or override wins), so a documented command cannot rot unnoticed."""

from __future__ import annotations

import argparse
import json
import re
import shlex

import pytest
from helpers import REPO

from spkdist import train
from spkdist.cli import build_parser, main

README = (REPO / "README.md").read_text()

# (README line as written, minus comments and [optional] brackets; what this test appends to make it quick)
QUICK_TRAINING = ["train.max_steps=2", "train.eval_every=2", "data.num_workers=0", "log.tracker=none"]
QUICK_TRAINING += ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.ffn_dim=32"]
COMMANDS = [
    ("spkdist shard --demo", ["--workers", "1"]),
    ("spkdist verify shards/hw4", []),
    ("spkdist inspect shards/hw4", []),
    ("spkdist bench shard --scale 0.25", ["--scale", "0.002", "--workers", "1"]),
    (
        "python launch/train.py --config boss.yaml data.shards=shards/fsdd-demo train.max_steps=300",
        [*QUICK_TRAINING, "train.output_dir=runs/boss"],
    ),
    ("spkdist evaluate --checkpoint runs/boss --shards shards/hw4 --split valid", ["--num-workers", "0"]),
    (
        "spkdist predict --checkpoint runs/boss --shards shards/hw4 --out predictions.csv",
        ["--num-workers", "0"],
    ),
    ("spkdist shard --demo --heldout-speakers 0.34 --out shards/fsdd-heldout", ["--workers", "1"]),
    (
        "python launch/train.py --config sample.yaml data.shards=shards/fsdd-heldout "
        "train.output_dir=runs/open-set train.eval_verification=true",
        [*QUICK_TRAINING, "train.verification_trials=50"],
    ),
    (
        "spkdist embed --checkpoint runs/open-set --shards shards/fsdd-heldout --split heldout --out emb.npz",
        ["--num-workers", "0"],
    ),
    ("spkdist trials --shards shards/fsdd-heldout --split heldout --out trials.txt", []),
    (
        "spkdist embed --checkpoint runs/open-set --shards shards/fsdd-heldout --split train "
        "--per-speaker-mean --out cohort.npz",
        ["--num-workers", "0"],
    ),
    (
        "spkdist score --embeddings emb.npz --trials trials.txt --norm asnorm --cohort cohort.npz",
        ["--top-n", "4"],
    ),
    ("spkdist export --checkpoint runs/open-set --out open-set.onnx --shards shards/fsdd-heldout", []),
    ("spkdist average runs/boss --last 3 --out runs/boss/averaged", ["--last", "1"]),
    ("spkdist bench loader --scale 0.25", ["--scale", "0.01", "--workers", "1", "--repeats", "1"]),
    ("spkdist bench step --models sample boss", ["--steps", "1", "--warmup", "0", "--repeats", "1"]),
    ("spkdist bench recipes --steps 300", ["--steps", "2", "--recipes", "sample", "--workers", "0"]),
    (
        "spkdist bench gpu --configs fp32 bf16 bf16+compile",
        ["--configs", "fp32", "--model", "sample", "--steps", "1", "--warmup", "0", "--scale", "0.02"],
    ),
]


def _optional(match: re.Match) -> str:
    """An [optional] part of a README command: kept, unless it needs the user's data (DIR) or root."""
    return "" if re.search(r"[A-Z]{2}|--cold", match[1]) else match[1]


def readme_commands() -> set[str]:
    """Every `spkdist ...` / `python launch/train.py ...` line of the README's code blocks, as run."""
    found = set()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"\[([^\]]*)\]", _optional, line)
            if line.startswith(("spkdist ", "python launch/train.py")):
                found.add(" ".join(line.split()))
    return found


def test_the_table_lists_every_cheap_readme_command():
    listed = {command for command, _ in COMMANDS}
    needing_data = {c for c in readme_commands() if re.search(r"/data/|list\.[ct]sv|\bDIR\b", c)}
    assert readme_commands() - needing_data == listed


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (shards/, runs/) land here
    for command, quick in COMMANDS:
        argv = shlex.split(command)[1:] + quick
        if command.startswith("python launch/train.py"):
            assert train.main(argv[1:]) == 0, command
        else:
            assert main(argv) == 0, command
        if command == "spkdist shard --demo":  # the README's later examples call their shards shards/hw4
            (tmp_path / "shards" / "hw4").symlink_to("fsdd-demo")
    out = capsys.readouterr().out
    evaluated = next(line for line in out.splitlines() if line.startswith('{"loss"'))
    assert json.loads(evaluated)["num_samples"] == 270  # FSDD's valid split
    assert (tmp_path / "predictions.csv").read_text().startswith("Id,Category\n")


@pytest.mark.parametrize("flag", ["--shard-samples", "--n-fft", "--f-max", "--workers"])
def test_zero_is_a_usage_error_not_the_default(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["shard", "--demo", "--out", str(tmp_path), flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a positive" in capsys.readouterr().err


def test_every_subcommand_help_has_an_example():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    benchmarks = next(a for a in commands["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    helps = {name: p.format_help() for name, p in commands.items() if name != "bench"}
    helps |= {f"bench {name}": p.format_help() for name, p in benchmarks.choices.items()}
    assert {"shard", "train", "evaluate", "predict", "configs", "bench gpu"} <= set(helps)
    for name, text in helps.items():
        assert "Example: " in text and "spkdist" in text.split("Example: ", 1)[1], name
