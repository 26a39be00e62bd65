"""Shard locations: index.json is untrusted input (names, counts, the speaker mapping), `pipe:` commands
get nothing unquoted, and a `{name}` template serves URLs whose shard name is not at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import small_overrides

from spkdist.config import load_config
from spkdist.errors import SpkdistError
from spkdist.infer import run_evaluate
from spkdist.shard_format import INDEX_NAME, load_index, shard_url
from spkdist.train import run


def tampered(tiny_shards: Path, tmp_path: Path, edit) -> Path:
    """A copy of the shards whose index.json `edit(index)` changed."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    index = json.loads((out / INDEX_NAME).read_text())
    edit(index)
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


def test_a_shard_name_that_leaves_the_directory_is_refused(tiny_shards, tmp_path):
    def escape(index):
        index["splits"]["valid"]["shards"][0]["name"] = "../elsewhere/valid-000000.tar"

    out = tampered(tiny_shards, tmp_path, escape)
    message = (
        r"index\.json: splits\.valid\.shards\[0\]\.name: '\.\./elsewhere/valid-000000\.tar' is not a shard"
    )
    with pytest.raises(SpkdistError, match=message):
        load_index(out)


def test_a_shard_name_cannot_run_a_command_through_a_pipe_location(tiny_shards, tmp_path):
    marker = tmp_path / "PWNED"

    def inject(index):
        index["splits"]["valid"]["shards"][0]["name"] = f"valid-000000.tar; touch {marker}"

    out = tampered(tiny_shards, tmp_path, inject)
    with pytest.raises(SpkdistError, match=r"splits\.valid\.shards\[0\]\.name: .* is not a shard name"):
        load_index(f"pipe:cat {out}/{{name}}")
    assert not marker.exists()
    # and whatever reaches a shell is quoted: a name is one word, never a command
    assert shard_url("pipe:cat /d/{name}", "a b;c") == "pipe:cat /d/'a b;c'"
    assert shard_url("pipe:cat /d", "a b;c") == "pipe:cat /d/'a b;c'"
    assert shard_url("/d/", "train-000001.tar") == "/d/train-000001.tar"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ix: ix.update(n_mels="40"), "n_mels: expected a positive integer, got '40'"),
        (
            lambda ix: ix.update(speaker2id={"a": 0, "b": 2}),
            "speaker2id: class ids must be the integers 0..1",
        ),
        (lambda ix: ix.update(speaker2id=[1, 2]), "speaker2id: expected a mapping"),
        (
            lambda ix: ix["splits"].update(extra=ix["splits"]["test"]),
            "splits.extra: expected one of the splits",
        ),
        (
            lambda ix: ix["splits"]["train"]["shards"][1].update(num_samples=-3),
            r"splits\.train\.shards\[1\]\.num_samples: expected a count",
        ),
        (
            lambda ix: ix["splits"]["train"]["shards"][0].update(bytes="big"),
            r"splits\.train\.shards\[0\]\.bytes: expected a count",
        ),
        (
            lambda ix: ix["splits"]["test"]["shards"][0].update(sha256="xyz"),
            r"splits\.test\.shards\[0\]\.sha256: expected 64 lowercase hex digits",
        ),
        (
            lambda ix: ix["splits"]["valid"].update(num_samples=21),
            "splits.valid.num_samples: 21, but its shards",
        ),
    ],
)
def test_bad_index_fields_are_one_line_errors_naming_the_field(edit, message, tiny_shards, tmp_path):
    out = tampered(tiny_shards, tmp_path, edit)
    with pytest.raises(SpkdistError, match=message) as err:
        load_index(out)
    assert str(err.value).startswith(f"{out / INDEX_NAME}: ") and "\n" not in str(err.value)


def test_a_pipe_template_location_trains_and_evaluates(tiny_shards, tmp_path):
    location = f"pipe:cat {tiny_shards}/{{name}}"  # as `pipe:aws s3 cp s3://bucket/shards/{name} -` would
    overrides = [*small_overrides(tiny_shards, tmp_path / "run"), f"data.shards={location}"]
    result = run(load_config("sample.yaml", overrides))
    assert result.step == 4 and result.metrics["num_samples"] == 20
    metrics = run_evaluate(str(tmp_path / "run"), location, "valid", batch_size=8, num_workers=0)
    assert metrics["num_samples"] == 20 and metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5)
