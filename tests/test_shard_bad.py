"""Bad input never crashes and is never dropped silently: by default the run stops with one line naming the
file and the problem (exit 2); with --skip-bad the item is skipped, counted and listed in index.json."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spkdist.errors import BadItemError
from spkdist.shard_format import load_index
from spkdist.torchfile import load_tensor

# ------------------------------------------------------------------------------------------ HW4 input


def first_train_file(root: Path) -> Path:
    metadata = json.loads((root / "metadata.json").read_text())
    return root / next(iter(metadata["speakers"].values()))[0]["feature_path"]


def edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def set_first_mel_len(root: Path, mel_len: int) -> None:
    edit_json(root / "metadata.json", lambda d: next(iter(d["speakers"].values()))[0].update(mel_len=mel_len))


def save_features(root: Path, values: torch.Tensor, mel_len: int | None = None) -> None:
    torch.save(values, first_train_file(root))
    set_first_mel_len(root, len(values) if mel_len is None else mel_len)


def flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor's storage: torch.load would not notice
    path.write_bytes(data)


def nan_features(root: Path) -> None:
    values = torch.randn(30, 40)
    values[3, 7] = math.nan
    save_features(root, values)


def inf_features(root: Path) -> None:
    values = torch.randn(30, 40)
    values[0, 0] = -math.inf
    save_features(root, values)


def directory_instead_of_file(root: Path) -> None:
    path = first_train_file(root)
    path.unlink()
    path.mkdir()


def unknown_speaker(root: Path) -> None:
    edit_json(
        root / "metadata.json", lambda d: d["speakers"].update(id99999=[d["speakers"]["id10001"].pop()])
    )


# (name, damage, expected message): each leaves exactly one utterance unusable.
HW4_ITEM_CASES = [
    ("missing file", lambda r: first_train_file(r).unlink(), "file not found"),
    ("unreadable file", directory_instead_of_file, "cannot read"),
    (
        "garbage .pt",
        lambda r: first_train_file(r).write_bytes(b"not a tensor"),
        "not a readable torch.save file",
    ),
    (
        "truncated .pt",
        lambda r: first_train_file(r).write_bytes(first_train_file(r).read_bytes()[:900]),
        "corrupt",
    ),
    ("flipped byte in .pt", lambda r: flip_a_data_byte(first_train_file(r)), "fails its zip checksum"),
    ("not a tensor", lambda r: torch.save({"mel": torch.zeros(3, 40)}, first_train_file(r)), "holds a dict"),
    (
        "wrong n_mels",
        lambda r: save_features(r, torch.randn(30, 80)),
        "shape (30, 80), expected (frames, 40)",
    ),
    ("NaN values", nan_features, "NaN or inf"),
    ("inf values", inf_features, "NaN or inf"),
    ("zero frames", lambda r: save_features(r, torch.zeros(0, 40), mel_len=5), "zero-length utterance"),
    ("mel_len 0", lambda r: set_first_mel_len(r, 0), "zero-length utterance (mel_len 0"),
    ("mel_len mismatch", lambda r: set_first_mel_len(r, 1000), "but the metadata says 1000"),
    ("float16 overflow", lambda r: save_features(r, torch.full((30, 40), 1e6)), "exceed the float16 range"),
    ("unknown speaker", unknown_speaker, "speaker id99999 (metadata.json) is not in mapping.json"),
    (
        "entry without feature_path",
        lambda r: edit_json(r / "metadata.json", lambda d: d["speakers"]["id10002"][0].pop("feature_path")),
        "speakers.id10002[0]: entry has no feature_path",
    ),
]


@pytest.mark.parametrize(
    ("damage", "message"), [c[1:] for c in HW4_ITEM_CASES], ids=[c[0] for c in HW4_ITEM_CASES]
)
def test_bad_hw4_item_stops_the_run_or_is_skipped(
    damage, message, make_hw4, shard_cli, cli_error, tmp_path, capsys
):
    hw4 = make_hw4()
    damage(hw4)
    assert shard_cli(hw4, tmp_path / "strict") == 2
    error = cli_error()
    assert message in error and str(hw4) in error
    assert not (tmp_path / "strict" / "index.json").exists()
    assert not list((tmp_path / "strict").glob("*.partial"))

    assert shard_cli(hw4, tmp_path / "skip", "--skip-bad") == 0
    index = load_index(tmp_path / "skip")
    assert (
        len(index["skipped"]) == 1
        and message in f"{index['skipped'][0]['path']}: {index['skipped'][0]['reason']}"
    )
    assert sum(split["num_samples"] for split in index["splits"].values()) == 40 + 8 - 1
    assert "skipped 1 bad item, listed in index.json" in capsys.readouterr().out


HW4_FATAL_CASES = [
    (
        "malformed metadata.json",
        "metadata.json",
        lambda p: p.write_text('{"n_mels": 40, "speakers": {'),
        "not valid JSON",
    ),
    ("missing mapping.json", "mapping.json", Path.unlink, "mapping.json: missing"),
    (
        "id2speaker disagrees",
        "mapping.json",
        lambda p: edit_json(p, lambda d: d["id2speaker"].update({"0": "id10002"})),
        "id2speaker is not the inverse of speaker2id",
    ),
    (
        "speaker ids with a gap",
        "mapping.json",
        lambda p: edit_json(p, lambda d: (d["speaker2id"].update(id10001=7), d.pop("id2speaker"))),
        "speaker2id values must be the integers 0..3",
    ),
    (
        "n_mels disagree",
        "testdata.json",
        lambda p: edit_json(p, lambda d: d.update(n_mels=80)),
        "n_mels 80 differs from metadata.json's 40",
    ),
    (
        "speakers not a dict",
        "metadata.json",
        lambda p: edit_json(p, lambda d: d.update(speakers=[])),
        "'speakers'",
    ),
]


@pytest.mark.parametrize(
    ("name", "damage", "message"), [c[1:] for c in HW4_FATAL_CASES], ids=[c[0] for c in HW4_FATAL_CASES]
)
def test_bad_hw4_listing_stops_even_with_skip_bad(
    name, damage, message, make_hw4, shard_cli, cli_error, tmp_path
):
    hw4 = make_hw4()
    damage(hw4 / name)
    assert shard_cli(hw4, tmp_path / "out", "--skip-bad") == 2
    error = cli_error()
    assert error.startswith(f"spkdist: error: {hw4 / name}: ") and message in error


def test_everything_skipped_is_an_error(make_hw4, shard_cli, cli_error, tmp_path):
    hw4 = make_hw4(n_speakers=1, n_train=1, n_test=0)
    first_train_file(hw4).unlink()
    assert shard_cli(hw4, tmp_path / "out", "--skip-bad") == 2
    assert "every utterance was skipped as bad" in cli_error()


# ---------------------------------------------------------------------------------------- audio input


@pytest.fixture
def manifest_dir(fsdd_recordings, tmp_path) -> Path:
    """A manifest of 12 FSDD recordings (2 speakers) with copies of the wav files next to it."""
    root = tmp_path / "audio"
    root.mkdir()
    lines = ["path,speaker"]
    for speaker in ("george", "theo"):
        for take in range(6):
            name = f"0_{speaker}_{take}.wav"
            shutil.copy(fsdd_recordings / name, root / name)
            lines.append(f"{name},{speaker}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def write_wav(path: Path, samples: np.ndarray) -> None:
    sf.write(path, samples, 8000, subtype="FLOAT")


def append_line(manifest: Path, line: str) -> None:
    manifest.write_text(manifest.read_text() + line + "\n")


# (name, damage(root), expected message, usable utterances left of the 12)
AUDIO_ITEM_CASES = [
    ("missing wav", lambda r: (r / "0_george_0.wav").unlink(), "0_george_0.wav: file not found", 11),
    (
        "corrupt wav",
        lambda r: (r / "0_george_0.wav").write_bytes(b"RIFF????WAVE"),
        "0_george_0.wav: unreadable audio",
        11,
    ),
    (
        "empty wav",
        lambda r: write_wav(r / "0_george_0.wav", np.zeros(0, np.float32)),
        "empty audio (0 samples)",
        11,
    ),
    (
        "NaN samples",
        lambda r: write_wav(r / "0_george_0.wav", np.full(4000, np.nan, np.float32)),
        "0_george_0.wav: features contain NaN or inf",
        11,
    ),
    (
        "wrong field count",
        lambda r: append_line(r / "manifest.csv", "a.wav,theo,extra"),
        "manifest.csv:14: 3 fields, the header has 2",
        12,
    ),
    (
        "empty speaker",
        lambda r: append_line(r / "manifest.csv", "0_theo_0.wav,"),
        "manifest.csv:14: empty path or speaker",
        12,
    ),
    (
        "listed twice",
        lambda r: append_line(r / "manifest.csv", "0_theo_0.wav,theo"),
        "0_theo_0.wav: listed twice",
        12,
    ),
]


@pytest.mark.parametrize(
    ("damage", "message", "usable"), [c[1:] for c in AUDIO_ITEM_CASES], ids=[c[0] for c in AUDIO_ITEM_CASES]
)
def test_bad_audio_item_stops_the_run_or_is_skipped(
    damage, message, usable, manifest_dir, shard_cli, cli_error, tmp_path
):
    damage(manifest_dir)
    assert shard_cli(manifest_dir / "manifest.csv", tmp_path / "strict") == 2
    assert message in cli_error()

    assert shard_cli(manifest_dir / "manifest.csv", tmp_path / "skip", "--skip-bad") == 0
    index = load_index(tmp_path / "skip")
    assert [message in f"{item['path']}: {item['reason']}" for item in index["skipped"]] == [True]
    assert sum(split["num_samples"] for split in index["splits"].values()) == usable


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("path,spk", "expected path,speaker and optionally split"),
        ("path,speaker,split,extra", "expected path"),
    ],
)
def test_bad_manifest_header_stops_even_with_skip_bad(
    header, message, manifest_dir, shard_cli, tmp_path, capsys
):
    manifest = manifest_dir / "manifest.csv"
    manifest.write_text(header + "\n0_theo_0.wav,theo\n")
    assert shard_cli(manifest, tmp_path / "out", "--skip-bad") == 2
    assert message in capsys.readouterr().err


def test_bad_split_value_is_reported(manifest_dir, shard_cli, cli_error, tmp_path):
    manifest = manifest_dir / "manifest.csv"
    manifest.write_text("path\tspeaker\tsplit\n0_theo_0.wav\ttheo\ttrain\n0_theo_1.wav\ttheo\tdev\n")
    assert shard_cli(manifest, tmp_path / "out") == 2
    assert "manifest.csv:3: split 'dev' is not one of train, valid, test" in cli_error()


def test_randomly_damaged_pt_files_give_an_array_or_a_bad_item_error(tmp_path):
    """Flipped bits, truncations and zeroed runs anywhere in a .pt file: never another exception."""
    good = tmp_path / "good.pt"
    torch.save(torch.randn(30, 40), good)
    raw, rng, damaged, reasons = good.read_bytes(), np.random.default_rng(0), tmp_path / "damaged.pt", set()
    for trial in range(300):
        data = bytearray(raw)
        position = int(rng.integers(len(data)))
        if trial % 3 == 0:
            data[position] ^= 1 << int(rng.integers(8))
        elif trial % 3 == 1:
            del data[position:]
        else:
            data[position : position + 16] = bytes(len(data[position : position + 16]))
        damaged.write_bytes(data)
        try:
            assert load_tensor(damaged).dtype == np.float32
        except BadItemError as e:
            reasons.add(e.reason.split(" (")[0])
    assert "corrupt torch.save file" in reasons
    assert reasons <= {"corrupt torch.save file", "not a readable torch.save file"}
