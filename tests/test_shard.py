"""`spkdist shard` on HW4 input, and verify, inspect, the CLI, atomicity and the shard benchmark."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import make_tiny_shards, tar_samples

from spkdist.checkpoint import MODEL_FILE, checkpoint_dir, step_checkpoints
from spkdist.cli import build_parser, main
from spkdist.errors import SpkdistError
from spkdist.shard_format import INDEX_NAME, load_index, ustar_header, verify
from spkdist.stream import eval_loader
from spkdist.torchfile import load_tensor


def hw4_json(root, name):
    return json.loads((root / name).read_text())


def test_hw4_samples_match_the_source_files(make_hw4, shard_cli, read_split, tmp_path):
    hw4, out = make_hw4(), tmp_path / "out"
    assert shard_cli(hw4, out, "--workers", "2") == 0
    index = load_index(out)
    mapping, metadata = hw4_json(hw4, "mapping.json"), hw4_json(hw4, "metadata.json")
    assert index["speaker2id"] == mapping["speaker2id"]
    assert index["id2speaker"] == mapping["id2speaker"]  # string keys, as HW4 has them
    owner = {e["feature_path"]: speaker for speaker, entries in metadata["speakers"].items() for e in entries}
    seen_silence = False
    for split in ("train", "valid"):
        for key, feats, meta in read_split(out, split):
            expected = torch.load(hw4 / meta["source"]).numpy()  # (mel_len, 40) float32
            assert key == meta["source"].removesuffix(".pt")
            assert feats.dtype == np.float16 and feats.shape == expected.shape == (meta["num_frames"], 40)
            np.testing.assert_array_equal(feats, expected.astype(np.float16))
            assert meta["speaker"] == owner[meta["source"]]
            assert meta["speaker_id"] == mapping["speaker2id"][meta["speaker"]]
            seen_silence |= bool((feats == -20).any())
    assert seen_silence  # the -20 floor values survive
    n_train = sum(len(entries) for entries in metadata["speakers"].values())
    assert index["splits"]["train"]["num_samples"] + index["splits"]["valid"]["num_samples"] == n_train
    assert verify(out) == []


def test_hw4_test_split_is_unlabeled_in_testdata_order(make_hw4, shard_cli, read_split, tmp_path):
    hw4, out = make_hw4(), tmp_path / "out"
    assert shard_cli(hw4, out, "--shard-samples", "3") == 0
    test = read_split(out, "test")
    listed = [e["feature_path"] for e in hw4_json(hw4, "testdata.json")["utterances"]]
    assert [meta["source"] for _, _, meta in test] == listed
    assert [meta["order"] for _, _, meta in test] == list(range(len(listed)))
    assert {(meta["speaker"], meta["speaker_id"]) for _, _, meta in test} == {(None, -1)}


def test_valid_is_stratified_per_speaker_and_shards_mix_speakers(make_hw4, shard_cli, read_split, tmp_path):
    hw4, out = make_hw4(n_train=200), tmp_path / "out"
    assert shard_cli(hw4, out, "--valid-fraction", "0.2", "--shard-samples", "20") == 0
    per_speaker = {s: len(e) for s, e in hw4_json(hw4, "metadata.json")["speakers"].items()}
    valid = Counter(meta["speaker"] for _, _, meta in read_split(out, "valid"))
    assert valid == {s: round(n * 0.2) for s, n in per_speaker.items() if round(n * 0.2)}
    first_shard = read_split(out, "train")[:20]
    assert len({meta["speaker"] for _, _, meta in first_shard}) == 4


def test_float32_keeps_values_exactly(make_hw4, shard_cli, read_split, tmp_path):
    hw4, out = make_hw4(), tmp_path / "out"
    assert shard_cli(hw4, out, "--dtype", "float32") == 0
    _, feats, meta = read_split(out, "train")[0]
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(feats, torch.load(hw4 / meta["source"]).numpy())
    assert load_index(out)["features"]["dtype"] == "float32"


def test_same_input_and_seed_give_identical_shards(make_hw4, shard_cli, tmp_path):
    hw4 = make_hw4()
    runs = {
        "one worker": ("--shard-samples", "7"),
        "two workers": ("--shard-samples", "7", "--workers", "2"),
        "other seed": ("--shard-samples", "7", "--seed", "1"),
    }
    index = {}
    for name, options in runs.items():
        assert shard_cli(hw4, tmp_path / name, *options) == 0
        index[name] = load_index(tmp_path / name)
    assert index["one worker"] == index["two workers"]  # every byte of every shard (sha256) too
    assert index["other seed"]["splits"] != index["one worker"]["splits"]
    assert index["other seed"]["source"]["fingerprint"] == index["one worker"]["source"]["fingerprint"]


def test_shards_respect_sample_and_byte_caps(make_hw4, shard_cli, tmp_path):
    hw4 = make_hw4()
    assert shard_cli(hw4, tmp_path / "count", "--shard-samples", "6") == 0
    counts = [s["num_samples"] for s in load_index(tmp_path / "count")["splits"]["train"]["shards"]]
    assert counts[:-1] == [6] * (len(counts) - 1) and 0 < counts[-1] <= 6

    cap = 0.03  # MB: a few samples of 20-80 frames x 40 mels x 2 bytes each
    assert shard_cli(hw4, tmp_path / "bytes", "--shard-mb", str(cap)) == 0
    shards = load_index(tmp_path / "bytes")["splits"]["train"]["shards"]
    assert len(shards) > 3
    tar_end = 10240  # end-of-archive blocks and record padding come on top of the members
    assert all(s["bytes"] <= cap * 1e6 + tar_end for s in shards if s["num_samples"] > 1)
    assert verify(tmp_path / "bytes") == []


def test_verify_catches_a_flipped_byte(make_hw4, shard_cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard_cli(make_hw4(), out) == 0
    assert main(["verify", str(out)]) == 0
    shard = out / load_index(out)["splits"]["train"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    assert any("sha256" in problem for problem in verify(out))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    assert f"{shard}: sha256 does not match index.json" in capsys.readouterr().out


def test_verify_reads_shards_as_training_does(tmp_path):
    # A Fortran-order .npy: np.load accepts it, the training reader does not. Passing verify must mean
    # that the trainer can read the shard, so verify reports it.
    out = make_tiny_shards(tmp_path / "shards", {"train": 4, "valid": 1, "test": 1})
    entry = load_index(out)["splits"]["valid"]["shards"][0]
    path = out / entry["name"]
    data = path.read_bytes()
    fortran = data.replace(b"'fortran_order': False", b"'fortran_order': True ")
    assert fortran != data and len(fortran) == len(data)
    path.write_bytes(fortran)
    problems = verify(out)
    assert any("unsupported .npy header" in p for p in problems), problems
    with pytest.raises(SpkdistError, match=r"unsupported \.npy header"):
        list(
            eval_loader(str(out), load_index(out), "valid", batch_size=1, num_workers=0, rank=0, world_size=1)
        )


def test_inspect_prints_a_summary(make_hw4, shard_cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard_cli(make_hw4(), out) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    index = load_index(out)
    assert "speakers: 4 (id10001, id10002, id10003, id10004)" in text
    for split, info in index["splits"].items():
        assert any(line.split()[:2] == [split, str(info["num_samples"])] for line in text.splitlines())


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_of_the_shard_commands_is_documented():
    commands = subparsers(build_parser())
    parsers = [
        commands["shard"],
        commands["verify"],
        commands["inspect"],
        subparsers(commands["bench"])["shard"],
    ]
    for parser in parsers:
        options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        assert options
        for action in options:
            assert action.help, f"{parser.prog}: {action.dest} has no help text"
            assert all(option in parser.format_help() for option in action.option_strings)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["shard", "{tmp}/nowhere", "--out", "{tmp}/out"], "{tmp}/nowhere: no such file or directory"),
        (["shard", "--out", "{tmp}/out"], "give a SOURCE"),
        (["shard", "--demo", "{tmp}"], "--demo takes no SOURCE"),
        (["shard", "{tmp}"], "--out DIR is required"),
        (["verify", "{tmp}"], "{tmp}/index.json: missing"),
    ],
)
def test_usage_errors_are_one_line(argv, message, tmp_path, cli_error):
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert message.format(tmp=tmp_path) in cli_error()


def test_hw4_input_rejects_log_mel_options(make_hw4, shard_cli, cli_error, tmp_path):
    assert shard_cli(make_hw4(), tmp_path / "out", "--n-mels", "80") == 2
    assert "log-mel options are for audio inputs" in cli_error()


@contextlib.contextmanager
def shard_interrupted_midway(hw4, out, stderr, workers=1):
    """A `spkdist shard` subprocess (one sample per shard, each fsynced: writing takes a while), handed over
    once it has finished 4 shards and before it completes; killed with its workers afterwards."""
    command = [
        sys.executable,
        "-m",
        "spkdist.cli",
        "shard",
        str(hw4),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    proc = subprocess.Popen(
        [*command, "--shard-samples", "1"],
        stderr=stderr,
        start_new_session=True,  # its own process group, like a command started in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if our parent ignores Ctrl-C
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-000003.tar").exists() or (out / INDEX_NAME).exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run ended before it was stopped"
            time.sleep(0.001)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def assert_unfinished(out):
    """No index.json, and every tar file under its final name is complete (one whole sample each)."""
    assert not (out / INDEX_NAME).exists()
    finished = sorted(out.glob("*.tar"))
    assert len(finished) >= 4
    for path in finished:
        [(_, parts)] = tar_samples(path)
        meta, feats = json.loads(parts["json"]), np.load(io.BytesIO(parts["npy"]))
        assert feats.shape == (meta["num_frames"], 40)


def test_killed_run_never_looks_complete_and_a_rerun_rebuilds(make_hw4, shard_cli, tmp_path):
    hw4, out = make_hw4(n_train=400, n_test=0, frames=(200, 400)), tmp_path / "out"
    assert shard_cli(hw4, out) == 0  # a complete directory first: the killed rerun must not look complete
    with shard_interrupted_midway(hw4, out, subprocess.DEVNULL) as proc:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert_unfinished(out)
    assert len(list(out.glob("*.partial"))) <= 1

    assert shard_cli(hw4, out) == 0
    assert verify(out) == []
    # nothing is left of the killed run: no .partial files, shards or spool directory
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train-000000.tar", "valid-000000.tar"]


def test_ctrl_c_stops_cleanly(make_hw4, tmp_path):
    hw4, out = make_hw4(n_train=400, n_test=0, frames=(200, 400)), tmp_path / "out"
    with (
        open(tmp_path / "stderr", "w") as stderr,
        shard_interrupted_midway(hw4, out, stderr, workers=2) as proc,
    ):
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: main process and workers
        assert proc.wait(timeout=30) == 130
    assert (tmp_path / "stderr").read_text().endswith("\nspkdist: interrupted\n")
    assert "Traceback" not in (tmp_path / "stderr").read_text()
    assert_unfinished(out)
    assert not list(out.glob("*.partial"))


def test_bench_shard_reports_json(capsys, tmp_path):
    scratch = tmp_path / "not" / "yet"  # --dir is made when missing
    assert main(["bench", "shard", "--scale", "0.001", "--dir", str(scratch)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["utterances"] == 608  # every one of the 600 speakers keeps a train utterance, + 8 test
    assert result["utts_per_s"] > 0 and result["mb_per_s"] > 0
    # every figure is rounded to 3 decimals, so each is within `half` of its true value; at this scale
    # (tar_s ~ 0.02 s) the ratio of the rounded seconds can be off by a few percent, hence the range
    half = 0.0005
    low = (result["shard_s"] - half) / (result["tar_s"] + half)
    high = (result["shard_s"] + half) / (result["tar_s"] - half)
    assert low - half <= result["ratio_to_tar"] <= high + half
    assert list(scratch.iterdir()) == []  # the benchmark's data is cleaned up


def test_bench_dir_that_is_a_file_is_a_one_line_error(cli_error, tmp_path):
    (tmp_path / "file").write_text("")
    assert main(["bench", "shard", "--scale", "0.001", "--dir", str(tmp_path / "file")]) == 2
    expected = f"spkdist: error: {tmp_path / 'file'}: cannot be the benchmark's directory (File exists)"
    assert cli_error() == expected


def test_bench_recipes_checks_given_shards_before_training(make_hw4, shard_cli, cli_error, tmp_path):
    assert shard_cli(make_hw4(n_test=0), tmp_path / "out") == 0
    assert main(["bench", "recipes", "--shards", str(tmp_path / "out"), "--dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'out'}: no 'test' split in the shards (have: train, valid)" in cli_error()
    assert shard_cli(make_hw4(), tmp_path / "hw4-shards") == 0
    assert main(["bench", "recipes", "--shards", str(tmp_path / "hw4-shards")]) == 2
    assert "the test split of an HW4 directory is unlabeled" in cli_error()


@pytest.mark.parametrize(
    ("name", "size"), [("a.json", 0), ("uttr-0123456789abcdef.npy", 48_128), ("k" * 100, 10**9)]
)
def test_tar_headers_are_the_ones_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o444
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    ("tensor", "legacy_format"),
    [
        (torch.randn(50, 40), False),
        (torch.randn(80, 40)[10:60], False),  # a view: its storage starts before the data
        (torch.randn(40, 50).t(), False),  # not contiguous: read by torch.load instead
        (torch.randn(5, 40, dtype=torch.float64), False),
        (torch.randn(5, 40, dtype=torch.bfloat16), False),  # numpy has no bfloat16: torch.load
        (torch.zeros(0, 40), False),
        (torch.randn(5, 40), True),  # torch's pre-1.6 format: torch.load
    ],
)
def test_pt_reader_reads_what_torch_load_reads(tensor, legacy_format, tmp_path):
    torch.save(tensor, tmp_path / "t.pt", _use_new_zipfile_serialization=not legacy_format)
    expected = torch.load(tmp_path / "t.pt").double().numpy()
    np.testing.assert_array_equal(load_tensor(tmp_path / "t.pt").astype(np.float64), expected)


def test_bench_recipes_keeps_its_runs_in_dir(tiny_shards, capsys, tmp_path):
    argv = ["bench", "recipes", "--shards", str(tiny_shards), "--recipes", "sample", "--steps", "1"]
    argv += ["--workers", "0", "--dir", str(tmp_path / "runs")]
    assert main(argv) == 0
    (kept,) = step_checkpoints(checkpoint_dir(tmp_path / "runs" / "sample"))
    assert (kept / MODEL_FILE).is_file()  # there to be averaged, ensembled or evaluated again
    capsys.readouterr()
    assert main(argv) == 2  # a second benchmark into the same place does not train over the first
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("spkdist: error: training sample failed: ")
    assert "holds checkpoints of an earlier run" in last


def test_bench_recipes_shows_the_training_live_and_ends_on_its_error(tiny_shards, capsys):
    argv = ["bench", "recipes", "--shards", str(tiny_shards), "--recipes", "sample", "--steps", "1"]
    assert main([*argv, "--workers", "0", "--set", "optim.lr=-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout keeps only the report; the child's output went to stderr
    child, ours = captured.err.strip().splitlines()[-2:]
    assert child.startswith("spkdist: error: ") and "optim.lr" in child  # passed on as it came
    assert ours == f"spkdist: error: training sample failed: {child.removeprefix('spkdist: error: ')}"
