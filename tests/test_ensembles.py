"""Ensembles of checkpoints (posteriors averaged) and weight averaging of a run's last checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import small_overrides

from spkdist import checkpoint
from spkdist.cli import main
from spkdist.config import load_config
from spkdist.errors import SpkdistError
from spkdist.infer import PosteriorAverage, load_trained_model, run_evaluate
from spkdist.train import run


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory) -> Path:
    """A tiny boss run with a checkpoint at each of its 3 steps."""
    out = tmp_path_factory.mktemp("run") / "run"
    overrides = [*small_overrides(tiny_shards, out, steps=3), "train.save_every=1", "train.keep_last=5"]
    run(load_config("boss.yaml", [*overrides, "model.d_model=16", "model.n_heads=2", "model.n_layers=1"]))
    return out


def steps(run_dir: Path) -> list[Path]:
    return checkpoint.step_checkpoints(checkpoint.checkpoint_dir(run_dir))


def test_an_ensemble_of_one_model_predicts_and_scores_as_the_model(trained_run):
    model, _ = load_trained_model(trained_run)
    mels, lengths = torch.randn(5, 30, 40), torch.tensor([30, 12, 7, 30, 1])
    labels = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        logits, ensembled = model(mels, lengths), PosteriorAverage([model])(mels, lengths)
    assert torch.equal(logits.argmax(-1), ensembled.argmax(-1))
    torch.testing.assert_close(F.cross_entropy(ensembled, labels), F.cross_entropy(logits, labels))


def test_an_ensemble_of_checkpoints_evaluates_and_refuses_other_speakers(trained_run, tiny_shards, tmp_path):
    first, last = (str(p) for p in (steps(trained_run)[0], steps(trained_run)[-1]))
    metrics = run_evaluate([first, last], str(tiny_shards), "valid", batch_size=8, num_workers=0)
    assert metrics["num_samples"] == 20 and 0 <= metrics["accuracy"] <= 1
    twice = run_evaluate([last, last], str(tiny_shards), "valid", batch_size=8, num_workers=0)
    alone = run_evaluate(last, str(tiny_shards), "valid", batch_size=8, num_workers=0)
    assert twice["accuracy"] == alone["accuracy"] and twice["loss"] == pytest.approx(alone["loss"], rel=1e-5)

    other = tmp_path / "other"
    shutil.copytree(last, other)
    payload = torch.load(other / "model.pt", weights_only=True)
    payload["speaker2id"] = {f"x{i}": i for i in range(4)}
    torch.save(payload, other / "model.pt")
    with pytest.raises(SpkdistError, match="its speakers or n_mels differ"):
        run_evaluate([last, str(other)], str(tiny_shards), "valid", batch_size=8, num_workers=0)


def test_averaging_identical_checkpoints_gives_the_checkpoint(trained_run, tmp_path):
    copy = tmp_path / "copies"
    shutil.copytree(trained_run, copy, symlinks=True)
    newest = steps(copy)[-1]
    for older in steps(copy)[:-1]:
        shutil.copy(newest / "model.pt", older / "model.pt")
    out = checkpoint.average(copy, 3, tmp_path / "averaged")
    averaged = torch.load(out / "model.pt", weights_only=True)
    expected = torch.load(newest / "model.pt", weights_only=True)
    assert averaged["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(averaged["state_dict"][name], tensor), name


def test_spkdist_average_means_the_last_k_weights(trained_run, tiny_shards, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["average", str(trained_run), "--last", "2", "--out", str(out)]) == 0
    averaged = torch.load(out / "model.pt", weights_only=True)
    two = [torch.load(p / "model.pt", weights_only=True)["state_dict"] for p in steps(trained_run)[-2:]]
    name = "head.weight"
    torch.testing.assert_close(averaged["state_dict"][name], (two[0][name] + two[1][name]) / 2)
    assert averaged["averaged_from"] == ["step-00000002", "step-00000003"]
    assert run_evaluate(str(out), str(tiny_shards), "valid", batch_size=8, num_workers=0)["num_samples"] == 20
    assert main(["average", str(trained_run), "--last", "9", "--out", str(tmp_path / "x")]) == 2
    assert "3 step checkpoints, cannot average the last 9" in capsys.readouterr().err


def test_an_utterance_far_longer_than_any_training_crop_evaluates_whole(trained_run):
    model, payload = load_trained_model(trained_run)
    assert payload["config"]["data"]["segment_len"] == 32
    long = torch.randn(1, 3000, 40)  # 30 s of frames against 32-frame crops
    with torch.no_grad():
        alone = model(long, torch.tensor([3000]))
        padded = model(torch.cat([long, torch.zeros(1, 500, 40)], dim=1), torch.tensor([3000]))
    assert torch.isfinite(alone).all()
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)
