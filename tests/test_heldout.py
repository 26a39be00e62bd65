"""`spkdist shard --heldout-speakers`: the `heldout` split of speakers the classifier never sees."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from spkdist.cli import main
from spkdist.shard_format import HELDOUT, load_index
from spkdist.stream import eval_loader


def test_a_share_of_speakers_is_held_out_whole_and_the_classes_renumbered(
    make_hw4, shard_cli, read_split, tmp_path
):
    hw4 = make_hw4(n_speakers=10, n_train=100)
    mapping = json.loads((hw4 / "mapping.json").read_text())["speaker2id"]
    metadata = json.loads((hw4 / "metadata.json").read_text())["speakers"]
    out = tmp_path / "out"
    assert shard_cli(hw4, out, "--heldout-speakers", "0.3", "--seed", "4") == 0
    index = load_index(out)
    heldout = index["heldout_speakers"]
    assert len(heldout) == 3 and heldout == sorted(heldout)
    # The classifier: the other 7 speakers, ids 0..6 in HW4's own order; HW4's mapping kept beside it.
    kept = sorted((name for name in mapping if name not in heldout), key=mapping.get)
    assert index["speaker2id"] == {name: i for i, name in enumerate(kept)}
    assert index["source_speaker2id"] == mapping
    # Every utterance of a held-out speaker is in `heldout`, labeled by name only, and nowhere else.
    held = Counter(meta["speaker"] for _, _, meta in read_split(out, HELDOUT))
    assert held == {name: len(metadata[name]) for name in heldout}
    assert {meta["speaker_id"] for _, _, meta in read_split(out, HELDOUT)} == {-1}
    for split in ("train", "valid"):
        for _, _, meta in read_split(out, split):
            assert meta["speaker"] not in heldout
            assert meta["speaker_id"] == index["speaker2id"][meta["speaker"]]
    test = read_split(out, "test")  # HW4's unlabeled test split is untouched
    assert len(test) == len(json.loads((hw4 / "testdata.json").read_text())["utterances"])
    assert index["settings"]["heldout_fraction"] == 0.3
    # Deterministic: the same seed holds out the same speakers, another seed (here) others.
    again, other = tmp_path / "again", tmp_path / "other"
    assert shard_cli(hw4, again, "--heldout-speakers", "0.3", "--seed", "4") == 0
    assert shard_cli(hw4, other, "--heldout-speakers", "0.3", "--seed", "5") == 0
    assert load_index(again)["splits"] == index["splits"]
    assert load_index(other)["heldout_speakers"] != heldout


def test_a_file_names_the_held_out_speakers(make_hw4, shard_cli, read_split, tmp_path):
    hw4 = make_hw4()
    names = tmp_path / "heldout.txt"
    names.write_text("# speakers for verification\nid10002\n\nid10004  # the last one\n")
    out = tmp_path / "out"
    assert shard_cli(hw4, out, "--heldout-speakers", str(names)) == 0
    index = load_index(out)
    assert index["heldout_speakers"] == ["id10002", "id10004"]
    assert index["speaker2id"] == {"id10001": 0, "id10003": 1}
    # The evaluation stream carries the names of held-out speakers (for embed and trials).
    batches = list(eval_loader(str(out), index, HELDOUT, batch_size=64, num_workers=0, rank=0, world_size=1))
    assert {name for b in batches for name in b.speakers} == {"id10002", "id10004"}
    assert {label for b in batches for label in b.labels.tolist()} == {-1}


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ("id10002\nnobody\n", "heldout.txt:2: speaker 'nobody' is not in the corpus"),
        ("id10002\nid10002\n", "heldout.txt:2: speaker 'id10002' is listed twice"),
        ("# none\n", "heldout.txt: lists no speakers"),
        ("id10001\nid10002\nid10003\nid10004\n", "holds out every speaker"),
    ],
)
def test_bad_held_out_lists_are_one_line_errors(make_hw4, shard_cli, cli_error, tmp_path, lines, problem):
    names = tmp_path / "heldout.txt"
    names.write_text(lines)
    assert shard_cli(make_hw4(), tmp_path / "out", "--heldout-speakers", str(names)) == 2
    assert problem in cli_error()


@pytest.mark.parametrize(
    ("value", "problem"), [("0.01", "holds out 0 of 4 speakers"), ("1.5", "must be in (0, 1)")]
)
def test_bad_held_out_shares_are_one_line_errors(make_hw4, shard_cli, cli_error, tmp_path, value, problem):
    assert shard_cli(make_hw4(), tmp_path / "out", "--heldout-speakers", value) == 2
    assert problem in cli_error()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_classifying_commands_refuse_the_held_out_split(tiny_shards, capsys, tmp_path, command):
    checkpoint = Path(__file__).parent / "data" / "checkpoint-2026-12-01"
    args = ["--checkpoint", str(checkpoint), "--shards", str(tiny_shards), "--split", HELDOUT]
    code = main([command, *args, *(["--out", str(tmp_path / "p.csv")] if command == "predict" else [])])
    assert code == 2
    assert "are not classes of the model; use spkdist embed" in capsys.readouterr().err


def test_index_fields_of_held_out_speakers_are_checked(make_hw4, shard_cli, tmp_path):
    out = tmp_path / "out"
    assert shard_cli(make_hw4(), out, "--heldout-speakers", "0.5") == 0
    index = json.loads((out / "index.json").read_text())
    index["heldout_speakers"].append(next(iter(index["speaker2id"])))  # a class that is also held out
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(Exception, match="heldout_speakers: names must be distinct and not classes"):
        load_index(out)


def test_version_1_indexes_still_load(tiny_shards, tmp_path):
    index = json.loads((tiny_shards / "index.json").read_text())
    index["format_version"] = 1
    del index["heldout_speakers"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert load_index(tmp_path)["heldout_speakers"] == []
