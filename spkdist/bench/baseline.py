"""The classic floor: logistic regression on each utterance's mean and std log-mel, test accuracy.

Each utterance becomes 2 x n_mels numbers (the per-bin mean and standard deviation over its frames),
standardised with the training statistics; a multinomial logistic regression (L2-penalised, fitted to
convergence with L-BFGS in float64, deterministic) is fitted on train + valid and scored on test. Any
recipe worth training should beat it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..errors import SpkdistError
from ..shard_format import load_index, split_samples

EXAMPLE = "spkdist bench baseline --shards shards/hard"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", required=True, help="a labeled shard directory with train, valid and test"
    )
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights (per utterance)")


def statistics(shards: str, index: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean and std per mel bin (N, 2 n_mels) float64, class ids (N,)) of a split's utterances."""
    rows, labels = [], []
    for _, sample in split_samples(shards, index, split):
        mels = sample.mels.astype(np.float64)  # (frames, n_mels)
        rows.append(np.concatenate([mels.mean(axis=0), mels.std(axis=0)]))
        labels.append(sample.speaker_id)
    labels = np.array(labels)
    if (labels < 0).any():
        raise SpkdistError(f"{shards}: the {split} split has utterances without a class")
    return np.stack(rows), labels


def fit(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> torch.Tensor:
    """Weights (2 n_mels + 1, n_classes) of an L2-penalised multinomial logistic regression."""
    inputs = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]))  # a bias column
    targets = torch.from_numpy(y)
    weights = torch.zeros(inputs.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights], max_iter=1000, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(inputs @ weights, targets) + l2 * weights[:-1].pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weights.detach()


def run(args: argparse.Namespace) -> dict:
    index = load_index(args.shards)
    train = [statistics(args.shards, index, split) for split in ("train", "valid")]
    x, y = np.vstack([t[0] for t in train]), np.concatenate([t[1] for t in train])
    test_x, test_y = statistics(args.shards, index, "test")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    weights = fit((x - mean) / std, y, len(index["speaker2id"]), args.l2)
    test = torch.from_numpy(np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))]))
    accuracy = float(((test @ weights).argmax(1).numpy() == test_y).mean())
    print(
        f"logistic regression on mean+std log-mel: test accuracy {accuracy:.4f} on {len(test_y)} utterances "
        f"(fitted on {len(y)} train + valid)"
    )
    return {"baseline": "mean+std logistic regression", "test_accuracy": round(accuracy, 4)}
