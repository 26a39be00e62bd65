"""End to end on real speech (the embedded FSDD demo): shard -> train a small boss -> evaluate -> predict."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from helpers import tar_samples

REPO = Path(__file__).resolve().parent.parent


def test_fsdd_shard_train_evaluate_predict(fsdd_shards, tmp_path):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--config",
            "demo.yaml",
            f"data.shards={fsdd_shards}",
            f"train.output_dir={run_dir}",
            "train.max_steps=150",
            # a narrower boss than the demo's, to keep the test short
            "model.d_model=96",
            "model.n_layers=2",
            "model.kernel_size=15",
            "model.ffn_dim=192",
            "train.eval_every=75",
            "log.tracker=none",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]

    evaluate = subprocess.run(
        [
            "spkdist",
            "evaluate",
            "--checkpoint",
            str(run_dir),
            "--shards",
            str(fsdd_shards),
            "--split",
            "valid",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert metrics["num_samples"] == 270
    assert metrics["accuracy"] >= 0.9  # 6 speakers: chance is 0.17

    predictions = tmp_path / "predictions.csv"
    predict = subprocess.run(
        [
            "spkdist",
            "predict",
            "--checkpoint",
            str(run_dir),
            "--shards",
            str(fsdd_shards),
            "--out",
            str(predictions),
            "--batch-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = list(csv.reader(predictions.open()))
    assert rows[0] == ["Id", "Category"] and len(rows) == 301  # FSDD's own test split: takes 0-4
    index = json.loads((fsdd_shards / "index.json").read_text())
    assert {category for _, category in rows[1:]} <= set(index["speaker2id"])
    # one row per test utterance, in the source's own order (not the shuffled shard order)
    expected = sorted(
        (meta["order"], meta["source"])
        for shard in index["splits"]["test"]["shards"]
        for meta in (json.loads(parts["json"]) for _, parts in tar_samples(fsdd_shards / shard["name"]))
    )
    assert [source for source, _ in rows[1:]] == [source for _, source in expected]
    # FSDD file names carry the speaker: the predictions must mostly match it
    correct = sum(Path(source).stem.split("_")[1] == category for source, category in rows[1:])
    assert correct / 300 >= 0.9
