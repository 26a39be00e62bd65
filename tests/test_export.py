"""`spkdist export`: ONNX graphs of every recipe match PyTorch, alone and in padded batches."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import N_MELS, N_SPEAKERS

from spkdist import export
from spkdist.cli import main
from spkdist.config import CONFIG_VERSION, RECIPES, load_config
from spkdist.infer import load_trained_model
from spkdist.models import build_model

# Tiny dims, full architecture; the boss variant has every lever on (feature normalisation in the graph).
VARIANTS = {name: [] for name in RECIPES} | {
    "boss+levers": [
        "model.feature_norm=mean_var",
        "model.pooling=attentive_stats",
        "model.head=aam_softmax",
        "model.layer_aggregation=concat",
        "model.frontend=conv2d",
        "model.frontend_channels=4",
    ]
}


def write_checkpoint(directory, variant: str):
    """A model.pt of `variant` at tiny size with random weights, as training writes it."""
    recipe = variant.split("+")[0]
    cfg = load_config(f"{recipe}.yaml", VARIANTS[variant])
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=16, n_heads=2, n_layers=2, ffn_dim=32, kernel_size=5),
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, N_MELS, N_SPEAKERS)
    directory.mkdir()
    payload = {
        "state_dict": model.state_dict(),
        "config": cfg.to_dict(),
        "config_version": CONFIG_VERSION,
        "n_mels": N_MELS,
        "speaker2id": {f"spk{i}": i for i in range(N_SPEAKERS)},
    }
    torch.save(payload, directory / "model.pt")
    return directory


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_graph_matches_pytorch_alone_and_padded(variant, tiny_shards, tmp_path, capsys):
    checkpoint, out = write_checkpoint(tmp_path / "ckpt", variant), tmp_path / "model.onnx"
    what = "logits" if variant == "boss+levers" else "embedding"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--shards", str(tiny_shards), "--what", what]
    assert main(["export", *args]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # three real utterances of different lengths from the valid split, alone and as one padded batch
    assert len(set(report["lengths"])) == 3 and report["inputs"].endswith("frames)")
    assert report["max_abs_diff"] < 1e-4 and report["max_abs_diff_padded_batch"] < 1e-4
    # batch and time are dynamic axes of the graph
    graph = onnx.load(out).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert isinstance(dims[0][0], str) and isinstance(dims[0][1], str) and dims[0][2] == N_MELS
    # a batch and lengths the check did not use: 5 utterances of 1..70 frames, padded to 70
    model, _ = load_trained_model(checkpoint)
    mels, lengths = torch.randn(5, 70, N_MELS), torch.tensor([70, 33, 9, 2, 1])
    mels[torch.arange(70) >= lengths[:, None]] = 0.0
    session = onnxruntime.InferenceSession(str(out))
    (got,) = session.run(None, {"mels": mels.numpy(), "lengths": lengths.numpy()})
    expected = export.Exported(model, what)(mels, lengths).detach().numpy()
    assert got.shape == (5, N_SPEAKERS if what == "logits" else 16)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_a_graph_that_differs_from_pytorch_is_not_written(tmp_path, monkeypatch, cli_error):
    checkpoint, out = write_checkpoint(tmp_path / "ckpt", "sample"), tmp_path / "model.onnx"
    monkeypatch.setattr(export, "TOLERANCE", 0.0)  # float32 round-off alone now fails the check
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "the ONNX model differs from PyTorch by" in cli_error()
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no temporary left


def test_a_missing_onnxruntime_is_named(tmp_path, monkeypatch, cli_error):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    checkpoint = write_checkpoint(tmp_path / "ckpt", "sample")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'spkdist[export]'" in cli_error()
