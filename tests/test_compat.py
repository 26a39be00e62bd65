"""Checkpoints written by earlier versions keep working: a committed one is evaluated, configs migrate."""

import json
from pathlib import Path

import pytest
import torch
from helpers import small_overrides

from spkdist.cli import main
from spkdist.config import config_from_dict, load_config, migrate_config
from spkdist.errors import SpkdistError
from spkdist.train import run

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


def test_resuming_a_checkpoint_of_the_first_format_is_a_one_line_error(tiny_shards, tmp_path):
    # it holds the loop counters only; this version also checkpoints the learning-rate schedule
    old = tmp_path / "run" / "checkpoints" / "step-00000006"
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes((OLD_CHECKPOINT / "model.pt").read_bytes())
    torch.save({"step": 6}, old / "custom_checkpoint_0.pkl")
    overrides = [*small_overrides(tiny_shards, tmp_path / "run"), "train.resume=latest"]
    with pytest.raises(SpkdistError, match=r"written by an earlier spkdist .* cannot be resumed"):
        run(load_config("sample.yaml", overrides))
