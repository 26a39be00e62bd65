"""Scale-out on CPU: DeepSpeed ZeRO-2 with 2 processes, and two 'nodes' on loopback forming one world."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import (
    LAUNCH,
    deepspeed_launcher,
    finish_groups,
    free_port,
    heldout_eer,
    probe,
    read_ranks,
    run_checked,
    small_overrides,
    start_group,
)

from spkdist import checkpoint
from spkdist.infer import run_evaluate
from spkdist.shard_format import load_index

pytest.importorskip("deepspeed")


def test_deepspeed_zero2_two_processes_train_save_and_resume(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = deepspeed_launcher("deepspeed_zero2")
    overrides = [*small_overrides(tiny_shards, run_dir, steps=6), "train.save_every=3", "optim.lr=3e-3"]

    first = tmp_path / "first"
    output = run_checked([*launcher, *probe(first, "boss.yaml", [*overrides, "train.max_steps=3"])])
    assert "2 process(es), DEEPSPEED" in output
    ranks = read_ranks(first)
    assert [r["world_size"] for r in ranks] == [2, 2]  # a naive launch runs 2 separate 1-process jobs
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # parameters and BatchNorm statistics

    resumed = tmp_path / "resumed"
    launcher = deepspeed_launcher("deepspeed_zero2")  # a fresh port
    output = run_checked([*launcher, *probe(resumed, "boss.yaml", [*overrides, "train.resume=latest"])])
    assert "at step 3" in output
    ranks = read_ranks(resumed)
    assert [r["step"] for r in ranks] == [6, 6]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] != read_ranks(first)[0]["checksum"]

    # The valid split is ONE shard (shared by sample between the ranks). The DeepSpeed checkpoint's
    # consolidated weights load on CPU without DeepSpeed and reproduce the run's shared evaluation.
    assert len(load_index(tiny_shards)["splits"]["valid"]["shards"]) == 1
    last = checkpoint.checkpoint_dir(run_dir) / "last"
    metrics = run_evaluate(str(last), str(tiny_shards), "valid", batch_size=16, num_workers=0)
    assert metrics["num_samples"] == ranks[0]["metrics"]["num_samples"] == 20
    assert metrics["loss"] == pytest.approx(ranks[0]["metrics"]["loss"], rel=1e-5)
    assert metrics["accuracy"] == ranks[0]["metrics"]["accuracy"]


def node_command(
    rank: int, port: int, prefix: Path, shards: Path, run_dir: Path, join_timeout: int = 30
) -> list[str]:
    """One node's launch of a 2-node job on loopback, one process per node."""
    return [
        *LAUNCH,
        "--multi_gpu",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--rdzv_conf",
        f"timeout={join_timeout}",  # the launcher gives up on a node that never joins (default: 600 s)
        *probe(prefix, "sample.yaml", small_overrides(shards, run_dir, steps=4)),
    ]


def test_two_nodes_on_loopback_form_one_world(tiny_shards, tmp_path):
    port, prefix = free_port(), tmp_path / "probe"
    nodes = [start_group(node_command(r, port, prefix, tiny_shards, tmp_path / "run")) for r in (0, 1)]
    outputs = finish_groups(nodes, timeout=300)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ranks = read_ranks(prefix)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_a_node_that_never_joins_fails_within_the_timeout(tiny_shards, tmp_path):
    start = time.time()
    command = node_command(0, free_port(), tmp_path / "probe", tiny_shards, tmp_path / "run", join_timeout=10)
    node = start_group(command)
    output = finish_groups([node], timeout=240)[0]
    assert node.returncode != 0
    assert time.time() - start < 120, output[-2000:]


@pytest.mark.parametrize("recipe", ["sample", "boss"])  # Transformer and Conformer encoders
def test_deepspeed_zero3_evaluates_with_uneven_ranks_and_its_checkpoint_on_cpu(
    recipe, one_utterance_valid, tmp_path
):
    run_dir, prefix = tmp_path / "run", tmp_path / "probe"
    # with the held-out EER: 2 embedding batches on rank 0, 1 on rank 1 (idle passes again)
    overrides = [
        *small_overrides(one_utterance_valid, run_dir, steps=4),
        "train.eval_verification=true",
        "train.verification_trials=30",
    ]
    output = run_checked(
        [*deepspeed_launcher("deepspeed_zero3"), *probe(prefix, f"{recipe}.yaml", overrides)]
    )
    assert "2 process(es), DEEPSPEED" in output
    ranks = read_ranks(prefix)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    # The valid split is one utterance, so rank 1 has no evaluation batch while rank 0 has one: under
    # ZeRO-3 every forward pass is a collective, and without idle passes on rank 1 evaluation would hang.
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["num_samples"] == 1
    # ZeRO-3 shards the weights; the checkpoint's gathered copy must reproduce the run's own evaluation
    metrics = run_evaluate(str(run_dir), str(one_utterance_valid), "valid", batch_size=16, num_workers=0)
    assert metrics["num_samples"] == 1
    assert metrics["loss"] == pytest.approx(ranks[0]["metrics"]["loss"], rel=1e-5)
    eer = heldout_eer(run_dir, one_utterance_valid, 30, seed=0, tmp=tmp_path)
    assert ranks[0]["metrics"]["eer"] == pytest.approx(eer, abs=1e-6)
