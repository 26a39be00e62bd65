"""Pictures for the W&B dashboard of a run, from one evaluation over all ranks' validation data.

`EvalDetails` collects, during `spkdist.evaluation.evaluate`, per-speaker counts (summed over ranks), the
misclassified pairs and the embeddings of a bounded sample of speakers (gathered from all ranks);
`evaluation_panels` turns them into W&B objects (one table row per speaker; the rest bounded):

    valid/per_speaker      table: speaker, utterances, correct, accuracy (worst first)
    valid/confused_pairs   table: the most confused speaker pairs and how often
    valid/confusion        image: the row-normalised confusion matrix, only for <= MAX_MATRIX speakers
    valid/embeddings       table + scatter: a 2-D PCA projection of sampled embeddings, by speaker

and with train.eval_verification (`score_histograms`), the held-out speakers' trial scores:

    valid/target_scores, valid/nontarget_scores   histograms of the cosine scores of each kind of trial
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

MAX_MATRIX = 50  # speakers up to which the confusion matrix is logged as an image (HW4's 600: 360,000 cells)
TOP_PAIRS = 20  # most-confused speaker pairs listed
SAMPLE_SPEAKERS = 12  # speakers (the lowest ids) whose embeddings are projected
SAMPLE_PER_SPEAKER = 20  # utterances per sampled speaker and rank


class EvalDetails:
    """Per-speaker counts, the misclassified (true, predicted) pairs and an embedding sample of one
    evaluation; `reduce` combines all ranks. Memory and traffic grow with the speakers and the errors,
    never with speakers squared (a 600 x 600 matrix is never built beyond MAX_MATRIX speakers)."""

    def __init__(self, n_speakers: int, device: torch.device) -> None:
        self.totals = torch.zeros(n_speakers, dtype=torch.int64, device=device)
        self.correct = torch.zeros(n_speakers, dtype=torch.int64, device=device)
        self._errors: list[tuple[int, int]] = []
        self._taken = [0] * min(n_speakers, SAMPLE_SPEAKERS)
        self._embeddings: list[np.ndarray] = []
        self._labels: list[int] = []

    def add(self, host_labels: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, emb) -> None:
        """One batch: its labels on the host (to choose the sample without a device read) and on the
        device, the predicted ids (B,) and the embeddings (B, D)."""
        ones = torch.ones_like(labels)
        self.totals.index_add_(0, labels, ones)
        hit = predicted == labels
        self.correct.index_add_(0, labels, hit.long())
        wrong = (~hit).nonzero().squeeze(1)  # evaluation may read back: the errors go to the host
        self._errors += zip(labels[wrong].tolist(), predicted[wrong].tolist(), strict=True)
        chosen = []
        for row, label in enumerate(host_labels.tolist()):
            if label < len(self._taken) and self._taken[label] < SAMPLE_PER_SPEAKER:
                self._taken[label] += 1
                chosen.append(row)
                self._labels.append(label)
        if chosen:
            self._embeddings.append(emb[chosen].float().cpu().numpy())

    def reduce(self, accelerator: Accelerator) -> Results:
        """Everything over all ranks. A collective: every rank calls it."""
        totals = accelerator.reduce(self.totals, reduction="sum").cpu().numpy()
        correct = accelerator.reduce(self.correct, reduction="sum").cpu().numpy()
        mine = (np.concatenate(self._embeddings) if self._embeddings else None, self._labels, self._errors)
        parts = [mine] if accelerator.num_processes == 1 else gather_object([mine])
        embeddings = [e for e, _, _ in parts if e is not None]
        return Results(
            totals,
            correct,
            Counter(pair for _, _, errors in parts for pair in errors),
            np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
            np.array([label for _, labels, _ in parts for label in labels], dtype=np.int64),
        )


@dataclass
class Results:
    """One evaluation's dashboard data, over all ranks."""

    totals: np.ndarray  # (N,) utterances per speaker
    correct: np.ndarray  # (N,) of them classified right
    errors: Counter  # (true, predicted) -> count, the misclassifications
    embeddings: np.ndarray  # (M, D) sampled embeddings
    labels: np.ndarray  # (M,) their speakers


def evaluation_panels(results: Results, id2speaker: dict[int, str]) -> dict[str, Any]:
    """W&B objects (tables, an image, a scatter plot) for one evaluation; see the module doc."""
    import wandb  # only runs with the wandb tracker get here

    n = len(results.totals)
    names = [id2speaker[i] for i in range(n)]
    totals, correct = results.totals, results.correct
    rows = [
        [names[i], int(totals[i]), int(correct[i]), float(correct[i] / totals[i])]
        for i in np.argsort(correct / np.maximum(totals, 1), kind="stable")
        if totals[i] > 0
    ]
    panels: dict[str, Any] = {
        "valid/per_speaker": wandb.Table(columns=["speaker", "utterances", "correct", "accuracy"], data=rows)
    }
    pairs = Counter()
    for (true, predicted), count in results.errors.items():
        pairs[min(true, predicted), max(true, predicted)] += count  # a->b and b->a together
    panels["valid/confused_pairs"] = wandb.Table(
        columns=["speaker_a", "speaker_b", "confusions"],
        data=[[names[a], names[b], count] for (a, b), count in pairs.most_common(TOP_PAIRS)],
    )
    if n <= MAX_MATRIX:
        confusion = np.diag(correct).astype(np.int64)
        for (true, predicted), count in results.errors.items():
            confusion[true, predicted] += count
        panels["valid/confusion"] = wandb.Image(
            confusion_image(confusion), caption="rows: true speaker, columns: predicted (row-normalised)"
        )
    if len(results.embeddings) >= 3:
        xy = pca_2d(results.embeddings)
        points = [[float(x), float(y), names[s]] for (x, y), s in zip(xy, results.labels, strict=True)]
        table = wandb.Table(columns=["x", "y", "speaker"], data=points)
        panels["valid/embeddings"] = table
        panels["valid/embeddings_scatter"] = wandb.plot.scatter(table, "x", "y", title="embeddings (PCA)")
    return panels


def score_histograms(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """W&B histograms of the target and the non-target trials' scores (on one dashboard panel each)."""
    import wandb

    return {
        "valid/target_scores": wandb.Histogram(scores[labels == 1]),
        "valid/nontarget_scores": wandb.Histogram(scores[labels == 0]),
    }


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(M, D) -> (M, 2): the projection on the two principal axes (an SVD of the centred rows)."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


# From dark blue through teal and green to yellow, as viridis: 0 = never, 1 = always.
_COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def confusion_image(confusion: np.ndarray, size: int = 400) -> np.ndarray:
    """The row-normalised matrix as an RGB image (uint8), each cell a square block of pixels."""
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)  # (N, N) in [0, 1]
    position = rates * (len(_COLOURS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_COLOURS) - 2)
    rgb = _COLOURS[low] + (position - low)[..., None] * (_COLOURS[low + 1] - _COLOURS[low])  # (N, N, 3)
    block = max(1, size // len(confusion))
    return np.kron(rgb, np.ones((block, block, 1))).astype(np.uint8)
