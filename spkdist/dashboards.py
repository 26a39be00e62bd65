"""Pictures for the W&B dashboard of a run, from one evaluation over all ranks' validation data.

`EvalDetails` collects, during `spkdist.evaluation.evaluate`, the confusion counts of every speaker pair
(summed over ranks) and the embeddings of a bounded sample of speakers (gathered from all ranks);
`evaluation_panels` turns them into W&B objects, all bounded in size whatever the speaker count:

    valid/per_speaker      table: speaker, utterances, correct, accuracy (worst first)
    valid/confused_pairs   table: the most confused speaker pairs and how often
    valid/confusion        image: the row-normalised confusion matrix, only for <= MAX_MATRIX speakers
    valid/embeddings       table + scatter: a 2-D PCA projection of sampled embeddings, by speaker
"""

from __future__ import annotations

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
    """Confusion counts and an embedding sample of one evaluation; `reduce` combines all ranks."""

    def __init__(self, n_speakers: int, device: torch.device) -> None:
        self.confusion = torch.zeros(n_speakers, n_speakers, dtype=torch.int64, device=device)  # true, pred
        self._taken = [0] * min(n_speakers, SAMPLE_SPEAKERS)
        self._embeddings: list[np.ndarray] = []
        self._labels: list[int] = []

    def add(self, host_labels: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, emb) -> None:
        """One batch: its labels on the host (to choose the sample without a device read) and on the
        device, the predicted ids (B,) and the embeddings (B, D)."""
        self.confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        chosen = []
        for row, label in enumerate(host_labels.tolist()):
            if label < len(self._taken) and self._taken[label] < SAMPLE_PER_SPEAKER:
                self._taken[label] += 1
                chosen.append(row)
                self._labels.append(label)
        if chosen:
            self._embeddings.append(emb[chosen].float().cpu().numpy())

    def reduce(self, accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(confusion (N, N), embeddings (M, D), labels (M,)) over all ranks. A collective."""
        confusion = accelerator.reduce(self.confusion, reduction="sum").cpu().numpy()
        mine = (np.concatenate(self._embeddings) if self._embeddings else None, self._labels)
        parts = [mine] if accelerator.num_processes == 1 else gather_object([mine])
        embeddings = [e for e, _ in parts if e is not None]
        labels = [label for _, rank_labels in parts for label in rank_labels]
        stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
        return confusion, stacked, np.array(labels, dtype=np.int64)


def evaluation_panels(
    confusion: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, id2speaker: dict[int, str]
) -> dict[str, Any]:
    """W&B objects (tables, an image, a scatter plot) for one evaluation; see the module doc."""
    import wandb  # only runs with the wandb tracker get here

    n = len(confusion)
    names = [id2speaker[i] for i in range(n)]
    totals, correct = confusion.sum(axis=1), np.diag(confusion)
    rows = [
        [names[i], int(totals[i]), int(correct[i]), float(correct[i] / totals[i])]
        for i in np.argsort(correct / np.maximum(totals, 1))
        if totals[i] > 0
    ]
    panels: dict[str, Any] = {
        "valid/per_speaker": wandb.Table(columns=["speaker", "utterances", "correct", "accuracy"], data=rows)
    }
    pairs = np.triu(confusion + confusion.T, k=1)  # a->b and b->a together
    top = [divmod(int(k), n) for k in np.argsort(pairs, axis=None)[::-1][:TOP_PAIRS]]
    panels["valid/confused_pairs"] = wandb.Table(
        columns=["speaker_a", "speaker_b", "confusions"],
        data=[[names[a], names[b], int(pairs[a, b])] for a, b in top if pairs[a, b] > 0],
    )
    if n <= MAX_MATRIX:
        panels["valid/confusion"] = wandb.Image(
            confusion_image(confusion), caption="rows: true speaker, columns: predicted (row-normalised)"
        )
    if len(embeddings) >= 3:
        xy = pca_2d(embeddings)
        table = wandb.Table(
            columns=["x", "y", "speaker"],
            data=[[float(x), float(y), names[s]] for (x, y), s in zip(xy, labels, strict=True)],
        )
        panels["valid/embeddings"] = table
        panels["valid/embeddings_scatter"] = wandb.plot.scatter(table, "x", "y", title="embeddings (PCA)")
    return panels


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
