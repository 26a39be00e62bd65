"""Verification: EER and minDCF against brute force, AS-norm against its formula, trial lists, bad input,
and embed -> trials -> score end to end on FSDD."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import small_overrides

from spkdist.cli import main
from spkdist.config import load_config
from spkdist.errors import SpkdistError
from spkdist.shard_format import load_index
from spkdist.train import run
from spkdist.verification import Embeddings, asnorm, eer, make_trials, min_dcf, read_trials


def brute_rates(scores, labels):
    """P_miss and P_fa at every distinct score and +inf, straight from the definitions."""
    rates = []
    for t in [*sorted(set(scores.tolist())), np.inf]:
        rates.append((np.mean(scores[labels == 1] < t), np.mean(scores[labels == 0] >= t)))
    return rates


def test_a_small_example_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert eer(scores, labels) == pytest.approx((1 / 3, 0.7))  # at 0.7 both rates are 1/3
    assert min_dcf(scores, labels, 0.01) == pytest.approx(1 / 3)  # at 0.8: miss 1/3, no false alarm


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 3])  # 1 decimal: many ties
def test_eer_and_min_dcf_agree_with_brute_force(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * 1.0, 1.0), decimals)
    rates = brute_rates(scores, labels)
    for p_target in (0.01, 0.05, 0.5):
        costs = [p_target * m + (1 - p_target) * f for m, f in rates]
        assert min_dcf(scores, labels, p_target) == pytest.approx(min(costs) / min(p_target, 1 - p_target))
    # the interpolated crossing lies between the best threshold's mean and max of the two rates
    rate, _ = eer(scores, labels)
    assert min((m + f) / 2 for m, f in rates) - 1e-12 <= rate <= min(max(m, f) for m, f in rates) + 1e-12


def test_perfect_separation_and_all_equal_scores():
    labels = np.array([1, 1, 0, 0, 0])
    assert eer(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), labels)[0] == 0.0
    assert min_dcf(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), labels, 0.01) == 0.0
    assert eer(np.full(5, 0.4), labels)[0] == pytest.approx(0.5)  # no score tells them apart
    assert min_dcf(np.full(5, 0.4), labels, 0.01) == pytest.approx(1.0)  # no better than rejecting all


def test_asnorm_is_the_formula():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    emb, cohort = unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(9, 4)))
    enroll, test = np.array([0, 1, 2]), np.array([3, 4, 5])
    got = asnorm(emb, enroll, test, cohort, top_n=4)
    for i, (e, t) in enumerate(zip(enroll, test, strict=True)):
        s = emb[e] @ emb[t]
        top_e, top_t = np.sort(cohort @ emb[e])[-4:], np.sort(cohort @ emb[t])[-4:]
        expected = 0.5 * (s - top_e.mean()) / top_e.std() + 0.5 * (s - top_t.mean()) / top_t.std()
        assert got[i] == pytest.approx(expected)


def test_trials_are_seeded_balanced_and_never_self_pairs():
    keys = [f"u{i}" for i in range(40)]
    speakers = [f"s{i % 5}" for i in range(40)]
    trials = make_trials(keys, speakers, targets=50, nontargets=60, seed=3)
    assert trials == make_trials(keys, speakers, targets=50, nontargets=60, seed=3)
    assert trials != make_trials(keys, speakers, targets=50, nontargets=60, seed=4)
    speaker = dict(zip(keys, speakers, strict=True))
    assert all(a != b and (speaker[a] == speaker[b]) == (label == 1) for label, a, b in trials)
    per_speaker = Counter(speaker[a] for label, a, _ in trials if label == 1)
    assert sum(per_speaker.values()) == 50 and max(per_speaker.values()) - min(per_speaker.values()) <= 1
    assert sum(1 for label, *_ in trials if label == 0) == 60


def test_bad_trials_and_embeddings_are_one_line_errors(tmp_path, capsys):
    emb = Embeddings(np.array(["a", "b"]), np.array(["x", "y"]), np.eye(2, dtype=np.float32))
    (tmp_path / "t1").write_text("1 a b\n2 a b\n")
    with pytest.raises(SpkdistError, match=r"t1:2: expected `label enroll_key test_key`"):
        read_trials(tmp_path / "t1", emb)
    (tmp_path / "t2").write_text("1 a b\n0 a nope\n")
    with pytest.raises(SpkdistError, match=r"t2:2: key nope is not in the embeddings"):
        read_trials(tmp_path / "t2", emb)
    emb.save(tmp_path / "e.npz")
    Embeddings(np.array(["c"]), np.array(["z"]), np.ones((1, 3), np.float32)).save(tmp_path / "cohort.npz")
    (tmp_path / "t3").write_text("1 a b\n0 a b\n")
    with pytest.raises(SpkdistError, match=r"cohort\.npz: embeddings of dimension 3, .*e\.npz has 2"):
        from spkdist.open_set import run_score

        run_score(
            str(tmp_path / "e.npz"), str(tmp_path / "t3"), "asnorm", str(tmp_path / "cohort.npz"), 10, None
        )
    score = ["score", "--embeddings", str(tmp_path / "e.npz"), "--trials", str(tmp_path / "t3")]
    cohort = ["--cohort", str(tmp_path / "cohort.npz")]
    for flags in (["--norm", "asnorm"], cohort):  # AS-norm without a cohort; a cohort that cosine ignores
        assert main([*score, *flags]) == 2
        assert "--norm asnorm and --cohort go together" in capsys.readouterr().err


def test_held_out_fsdd_speakers_embed_trials_score_end_to_end(tmp_path, capsys):
    # 2 of FSDD's 6 speakers held out: the model trains on 4 and is scored on 2 it never heard
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    assert (
        main(["shard", "--demo", "--out", str(shards), "--workers", "2", "--heldout-speakers", "0.34"]) == 0
    )
    index = load_index(shards)
    assert len(index["heldout_speakers"]) == 2 and len(index["speaker2id"]) == 4
    overrides = [
        *small_overrides(shards, run_dir, steps=40),
        "optim.lr=3e-3",
        "train.log_every=20",
        "train.eval_verification=true",
        "train.verification_trials=300",
    ]
    result = run(load_config("sample.yaml", overrides))
    heldout = ["--shards", str(shards), "--split", "heldout"]
    emb, trials = str(tmp_path / "emb.npz"), str(tmp_path / "trials.txt")
    assert main(["embed", "--checkpoint", str(run_dir), *heldout, "--out", emb, "--num-workers", "0"]) == 0
    assert main(["trials", *heldout, "--out", trials, "--targets", "300", "--nontargets", "300"]) == 0
    cohort = str(tmp_path / "cohort.npz")
    train_split = ["--shards", str(shards), "--split", "train", "--per-speaker-mean"]
    assert (
        main(["embed", "--checkpoint", str(run_dir), *train_split, "--out", cohort, "--num-workers", "0"])
        == 0
    )
    said = capsys.readouterr().out
    assert f"wrote one embedding each to {emb}\n" in said
    assert f"wrote each speaker's mean embedding to {cohort}\n" in said  # 4 means, not 4 speakers' utterances
    assert main(["score", "--embeddings", emb, "--trials", trials]) == 0
    plain = json.loads(capsys.readouterr().out)
    asnorm = ["--norm", "asnorm", "--cohort", cohort, "--top-n", "4"]
    assert main(["score", "--embeddings", emb, "--trials", trials, *asnorm]) == 0
    normed = json.loads(capsys.readouterr().out)
    assert plain["target_trials"] == plain["nontarget_trials"] == 300
    assert plain["eer"] < 0.3 and normed["norm"] == "asnorm" and normed["eer"] < 0.3  # chance: 0.5
    # the trainer scored the same seeded trials on the same model: the same EER
    assert result.metrics["eer"] == pytest.approx(plain["eer"], abs=1e-6)
    embeddings = Embeddings.load(emb)
    assert (
        set(embeddings.speakers) == set(index["heldout_speakers"]) and len(Embeddings.load(cohort).keys) == 4
    )
