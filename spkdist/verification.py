"""Speaker verification: cosine scoring of trials, adaptive s-norm, EER and minDCF.

A trial list has one `label enroll_key test_key` line per trial (1: same speaker, 0: not), the
VoxCeleb list format. Embeddings files (`spkdist embed`) are .npz archives with `keys`, `speakers` and
L2-normalised `embeddings` (N, D).

Error rates: a trial is accepted when its score is >= the threshold. At each distinct score t,
P_miss(t) is the share of target trials scored below t and P_fa(t) the share of non-target trials scored
at or above it. The EER is where the two curves cross, linearly interpolated between the two nearest
thresholds; minDCF is min over thresholds of C_miss P_target P_miss + C_fa (1 - P_target) P_fa,
normalised by the cost of the best trivial decision, min(C_miss P_target, C_fa (1 - P_target)) (NIST).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpkdistError
from .fsutil import atomic_write_bytes


@dataclass(frozen=True)
class Embeddings:
    """One embeddings file: utterance keys, speaker names ('' when unknown), rows L2-normalised."""

    keys: np.ndarray  # (N,) str
    speakers: np.ndarray  # (N,) str
    vectors: np.ndarray  # (N, D) float32

    @classmethod
    def from_rows(cls, rows: list[tuple[str, str, np.ndarray]]) -> Embeddings:
        """From (key, speaker, vector) rows (`spkdist.evaluation.embed`, any order), sorted by key."""
        keys, speakers, vectors = zip(*sorted(rows, key=lambda row: row[0]), strict=True)
        return cls(np.array(keys), np.array(speakers), np.stack(vectors).astype(np.float32))

    def save(self, path: str | os.PathLike) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, keys=self.keys, speakers=self.speakers, embeddings=self.vectors)
        atomic_write_bytes(path, buffer.getvalue())

    def speaker_means(self) -> Embeddings:
        """Each speaker's mean embedding, renormalised, keyed by the speaker's name."""
        names = sorted(set(self.speakers.tolist()))
        means = np.stack([self.vectors[self.speakers == name].mean(axis=0) for name in names])
        means /= np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)
        return Embeddings(np.array(names), np.array(names), means.astype(np.float32))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys, speakers, vectors = archive["keys"], archive["speakers"], archive["embeddings"]
        except (OSError, ValueError, KeyError) as e:
            raise SpkdistError(f"{path}: not an embeddings file of spkdist embed ({e})") from None
        if vectors.ndim != 2 or len(keys) != len(vectors) or len(speakers) != len(vectors):
            raise SpkdistError(f"{path}: keys, speakers and embeddings (N, D) do not match in length")
        return cls(keys.astype(str), speakers.astype(str), vectors.astype(np.float32))


def read_trials(path: str | os.PathLike, embeddings: Embeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels (T,), enroll rows (T,), test rows (T,)) of a trials file, checked line by line."""
    row = {key: i for i, key in enumerate(embeddings.keys)}
    labels, enroll, test = [], [], []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                raise SpkdistError(f"{path}:{number}: expected `label enroll_key test_key` with label 0 or 1")
            for key in parts[1:]:
                if key not in row:
                    raise SpkdistError(f"{path}:{number}: key {key} is not in the embeddings")
            labels.append(int(parts[0]))
            enroll.append(row[parts[1]])
            test.append(row[parts[2]])
    if not labels:
        raise SpkdistError(f"{path}: no trials")
    return np.array(labels), np.array(enroll), np.array(test)


def trial_rows(
    embeddings: Embeddings, trials: list[tuple[int, str, str]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, enroll rows, test rows) of an in-memory trial list (`make_trials`) whose keys are all
    in `embeddings` (KeyError otherwise: a programming error, unlike a trials file's bad line)."""
    row = {key: i for i, key in enumerate(embeddings.keys)}
    labels, enroll, test = zip(*((label, row[a], row[b]) for label, a, b in trials), strict=True)
    return np.array(labels), np.array(enroll), np.array(test)


def cosine_scores(embeddings: np.ndarray, enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of each trial's two (L2-normalised) embeddings; (T,)."""
    return np.einsum("td,td->t", embeddings[enroll], embeddings[test])


def asnorm(
    embeddings: np.ndarray, enroll: np.ndarray, test: np.ndarray, cohort: np.ndarray, top_n: int
) -> np.ndarray:
    """Adaptive s-norm: each raw cosine normalised by the statistics of the `top_n` highest cohort
    scores of its enrollment and of its test side, averaged: 0.5 (s - mu_e) / sd_e + 0.5 (s - mu_t) / sd_t.

    embeddings (N, D) and cohort (C, D) L2-normalised; `top_n` is capped at C.
    """
    raw = cosine_scores(embeddings, enroll, test)
    against = embeddings @ cohort.T  # (N, C): every utterance against the cohort
    top = -np.sort(-against, axis=1)[:, : min(top_n, len(cohort))]  # (N, top_n) highest first
    mean, std = top.mean(axis=1), top.std(axis=1).clip(min=1e-8)
    return 0.5 * (raw - mean[enroll]) / std[enroll] + 0.5 * (raw - mean[test]) / std[test]


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, P_miss, P_fa) at every distinct score and at +inf (nothing accepted)."""
    labels = labels.astype(bool)
    n_target, n_nontarget = labels.sum(), (~labels).sum()
    if n_target == 0 or n_nontarget == 0:
        raise SpkdistError("error rates need both target and non-target trials")
    order = np.argsort(scores, kind="stable")
    ordered, targets = scores[order], labels[order]
    thresholds, first = np.unique(ordered, return_index=True)  # first[k]: trials scored below thresholds[k]
    targets_below = np.concatenate([[0], np.cumsum(targets)])[first]
    nontargets_below = np.concatenate([[0], np.cumsum(~targets)])[first]
    p_miss = np.append(targets_below / n_target, 1.0)
    p_fa = np.append(1.0 - nontargets_below / n_nontarget, 0.0)
    return np.append(thresholds, np.inf), p_miss, p_fa


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(EER, threshold at the EER): where P_miss and P_fa cross, interpolated between thresholds."""
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    gap = p_miss - p_fa  # rises from -1 (all accepted) to 1 (none)
    k = int(np.argmax(gap >= 0))  # the first threshold at or past the crossing; k >= 1
    if gap[k] == 0:
        return float(p_miss[k]), float(thresholds[k])
    alpha = -gap[k - 1] / (gap[k] - gap[k - 1])
    rate = p_miss[k - 1] + alpha * (p_miss[k] - p_miss[k - 1])
    upper = thresholds[k] if np.isfinite(thresholds[k]) else thresholds[k - 1]
    return float(rate), float(thresholds[k - 1] + alpha * (upper - thresholds[k - 1]))


def min_dcf(
    scores: np.ndarray, labels: np.ndarray, p_target: float, c_miss: float = 1, c_fa: float = 1
) -> float:
    """The normalised minimum detection cost over all thresholds (see the module doc)."""
    _, p_miss, p_fa = error_rates(scores, labels)
    cost = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def score_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """What `spkdist score` prints: EER, its threshold, minDCF at P_target 0.01 and 0.05, trial counts."""
    rate, threshold = eer(scores, labels)
    return {
        "eer": round(rate, 6),
        "threshold": round(threshold, 6),
        "min_dcf_0.01": round(min_dcf(scores, labels, 0.01), 6),
        "min_dcf_0.05": round(min_dcf(scores, labels, 0.05), 6),
        "target_trials": int(labels.sum()),
        "nontarget_trials": int(len(labels) - labels.sum()),
    }


def make_trials(
    keys: list[str], speakers: list[str], targets: int, nontargets: int, seed: int
) -> list[tuple[int, str, str]]:
    """`targets` same-speaker and `nontargets` different-speaker trials, seeded, spread evenly over the
    speakers (they take turns), never an utterance paired with itself; as (label, enroll, test)."""
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[str]] = {}
    for key, speaker in zip(keys, speakers, strict=True):
        by_speaker.setdefault(speaker, []).append(key)
    names = sorted(by_speaker)
    pairable = [name for name in names if len(by_speaker[name]) >= 2]
    if len(names) < 2 or not pairable:
        raise SpkdistError("trials need at least two speakers, one of them with two utterances")
    trials, seen = [], set()
    for label, count in ((1, targets), (0, nontargets)):
        made, attempts = 0, 0
        while made < count and attempts < 50 * count:
            attempts += 1
            if label == 1:
                utterances = by_speaker[pairable[made % len(pairable)]]
                a, b = rng.choice(len(utterances), size=2, replace=False)
                pair = (utterances[a], utterances[b])
            else:
                first = names[made % len(names)]
                second = names[(made % len(names) + 1 + rng.integers(len(names) - 1)) % len(names)]
                pair = (rng.choice(by_speaker[first]), rng.choice(by_speaker[second]))
            if (label, *pair) in seen:
                continue
            seen.add((label, *pair))
            trials.append((label, str(pair[0]), str(pair[1])))
            made += 1
        if made < count:
            raise SpkdistError(f"only {made} distinct {'target' if label else 'non-target'} trials exist")
    return trials


def write_trials(path: str | os.PathLike, trials: list[tuple[int, str, str]]) -> None:
    atomic_write_bytes(path, "".join(f"{label} {a} {b}\n" for label, a, b in trials).encode())


def check_same_dim(a: Embeddings, b: Embeddings, a_path: Path, b_path: Path) -> None:
    if a.vectors.shape[1] != b.vectors.shape[1]:
        raise SpkdistError(
            f"{b_path}: embeddings of dimension {b.vectors.shape[1]}, {a_path} has {a.vectors.shape[1]}"
        )
