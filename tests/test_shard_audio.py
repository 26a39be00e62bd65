"""`spkdist shard` on audio: the FSDD demo (real speech), manifests and speaker folder trees."""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from spkdist.cli import main
from spkdist.shard_format import load_index, verify

FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def take(source: str) -> int:
    """The take number of an FSDD file name, {digit}_{speaker}_{take}.wav."""
    return int(re.fullmatch(r"\d_[a-z]+_(\d+)\.wav", source).group(1))


def test_fsdd_demo_uses_the_dataset_split(fsdd_shards, read_split):
    index = load_index(fsdd_shards)
    assert index["speaker2id"] == {name: i for i, name in enumerate(FSDD_SPEAKERS)}
    assert {split: info["num_samples"] for split, info in index["splits"].items()} == {
        "train": 2430,
        "valid": 270,
        "test": 300,
    }
    test, valid = read_split(fsdd_shards, "test"), read_split(fsdd_shards, "valid")
    assert {take(meta["source"]) for _, _, meta in test} == set(range(5))
    assert all(take(meta["source"]) >= 5 for _, _, meta in valid + read_split(fsdd_shards, "train"))
    # valid is carved from each speaker's 450 training takes: 10% = 45 each, and labeled test keeps labels
    assert Counter(meta["speaker"] for _, _, meta in valid) == dict.fromkeys(FSDD_SPEAKERS, 45)
    assert all(meta["speaker_id"] == index["speaker2id"][meta["speaker"]] for _, _, meta in test)
    assert len(index["splits"]["train"]["shards"]) == 13  # the demo caps shards at 200 samples
    assert verify(fsdd_shards) == []


def test_fsdd_features_are_log_mels_of_the_recordings(fsdd_shards, fsdd_recordings, read_split):
    features = load_index(fsdd_shards)["features"]
    expected = {"kind": "log-mel", "n_mels": 40, "sample_rate": 16000, "win_length": 400, "hop_length": 160}
    assert {key: features[key] for key in expected} == expected and features["dtype"] == "float16"
    floor = math.log(features["log_floor"])
    for _, feats, meta in read_split(fsdd_shards, "test")[:20]:
        seconds = sf.info(fsdd_recordings / meta["source"]).duration
        assert feats.dtype == np.float16 and feats.shape == (meta["num_frames"], 40)
        assert meta["num_frames"] == 1 + round(seconds * 16000) // 160  # centred frames, 10 ms hop
        assert feats.min() >= floor - 0.01 and feats.max() > floor + 5  # speech, not just the floor


def write_manifest(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_manifest_with_its_own_splits(fsdd_recordings, read_split, shard_cli, tmp_path):
    splits = {0: "test", 1: "valid", 2: "train", 3: "train"}
    rows = [f"0_{s}_{t}.wav\t{s}\t{splits[t]}" for s in ("george", "theo") for t in splits]
    manifest = write_manifest(tmp_path / "list.tsv", "path\tspeaker\tsplit", rows)
    assert (
        shard_cli(tmp_path, tmp_path / "out", "--manifest", str(manifest), "--format", "audio") != 0
    )  # wrong base
    assert (  # the manifest's own test split wins over --test-fraction
        shard_cli(fsdd_recordings, tmp_path / "out", "--manifest", str(manifest), "--test-fraction", "0.5")
        == 0
    )
    index = load_index(tmp_path / "out")
    assert index["source"]["format"] == "audio-manifest"
    for split in ("train", "valid", "test"):
        sources = sorted(meta["source"] for _, _, meta in read_split(tmp_path / "out", split))
        assert sources == sorted(
            f"0_{s}_{t}.wav" for s in ("george", "theo") for t in splits if splits[t] == split
        )


def make_speaker_tree(fsdd_recordings: Path, root: Path) -> Path:
    """ROOT/<speaker>/session<0|1>/*.wav: ten FSDD recordings each of lucas and nicolas, and a stray file."""
    for speaker in ("lucas", "nicolas"):
        for digit in range(10):
            (root / speaker / f"session{digit % 2}").mkdir(parents=True, exist_ok=True)
            wav = f"{digit}_{speaker}_7.wav"
            shutil.copy(fsdd_recordings / wav, root / speaker / f"session{digit % 2}" / wav)
    (root / "README.txt").write_text("not audio: ignored")
    return root


def test_speaker_folder_tree(fsdd_recordings, read_split, shard_cli, tmp_path):
    root = make_speaker_tree(fsdd_recordings, tmp_path / "corpus")
    assert (
        shard_cli(
            root, tmp_path / "out", "--valid-fraction", "0.2", "--sample-rate", "8000", "--n-mels", "24"
        )
        == 0
    )
    index = load_index(tmp_path / "out")
    assert index["speaker2id"] == {"lucas": 0, "nicolas": 1} and index["n_mels"] == 24
    assert index["features"]["sample_rate"] == 8000 and index["features"]["win_length"] == 200
    valid = read_split(tmp_path / "out", "valid")
    assert Counter(meta["speaker"] for _, _, meta in valid) == {"lucas": 2, "nicolas": 2}
    assert all(meta["source"].startswith(f"{meta['speaker']}/session") for _, _, meta in valid)
    assert "test" not in index["splits"]


def test_test_fraction_carves_a_labeled_test_split_per_speaker(
    fsdd_recordings, read_split, shard_cli, tmp_path
):
    root, out = make_speaker_tree(fsdd_recordings, tmp_path / "corpus"), tmp_path / "out"
    assert shard_cli(root, out, "--test-fraction", "0.3", "--valid-fraction", "0.2") == 0
    samples = {split: read_split(out, split) for split in ("train", "valid", "test")}
    # per speaker: 3 of 10 to test first, then round(7 x 0.2) = 1 to valid, 6 stay in train
    for split, count in {"train": 6, "valid": 1, "test": 3}.items():
        assert Counter(meta["speaker"] for _, _, meta in samples[split]) == {"lucas": count, "nicolas": count}
    sources = [meta["source"] for split in samples.values() for _, _, meta in split]
    assert len(set(sources)) == 20  # disjoint and complete
    assert all(meta["speaker_id"] >= 0 for _, _, meta in samples["test"])
    assert load_index(out)["settings"]["test_fraction"] == 0.3
    assert shard_cli(root, tmp_path / "bad", "--test-fraction", "0.9", "--valid-fraction", "0.2") == 2


def test_demo_command_prints_a_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output is shards/fsdd-demo under the working directory
    assert main(["shard", "--demo", "--workers", "2", "--shard-samples", "1000"]) == 0
    summary = capsys.readouterr().out
    assert "3,000 utterances, 6 speakers, 0.37 hours, 5 shards" in summary
    assert verify(tmp_path / "shards" / "fsdd-demo") == []
