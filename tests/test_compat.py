"""Checkpoints written by earlier versions keep working: a committed one is evaluated, configs migrate."""

import json
from pathlib import Path

import pytest

from spkdist.cli import main
from spkdist.config import config_from_dict, migrate_config

# A tiny `sample` model trained 6 steps on the `tiny_shards` fixture and saved on 2026-12-01, before the
# config had `model.encoder` (config layout 1); its evaluation then printed the metrics below.
OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-2026-12-01"


def test_a_checkpoint_of_the_first_format_still_evaluates(tiny_shards, capsys):
    argv = ["evaluate", "--checkpoint", str(OLD_CHECKPOINT), "--shards", str(tiny_shards)]
    assert main([*argv, "--num-workers", "0", "--batch-size", "16"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == {
        "loss": pytest.approx(1.3449294567108154, rel=1e-5),
        "accuracy": 0.5,
        "num_samples": 20,
    }


@pytest.mark.parametrize(
    ("name", "encoder"),
    [("sample", "transformer"), ("medium", "transformer"), ("strong", "conformer"), ("boss", "conformer")],
)
def test_layout_1_configs_get_the_encoder_their_recipe_name_implied(name, encoder):
    stored = {"model": {"name": name, "d_model": 16, "n_heads": 2}}
    migrated = migrate_config(stored, version=1)
    assert config_from_dict(migrated).model.encoder == encoder
    assert "encoder" not in stored["model"]  # the stored copy is left as it was
    assert migrate_config({"model": {"name": name, "encoder": "conformer"}}, version=2)["model"][
        "encoder"
    ] == ("conformer")
