"""Loss, accuracy and predictions over a whole split, for the trainer and `spkdist evaluate/predict`."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .dashboards import EvalDetails
from .errors import SpkdistError


def idle_input(n_mels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-frame dummy utterance (mels (1, 1, n_mels), lengths (1,)) for ZeRO-3 idle passes."""
    return torch.zeros(1, 1, n_mels, device=device), torch.ones(1, dtype=torch.long, device=device)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: Iterable,
    idle_n_mels: int | None = None,
    details: EvalDetails | None = None,
) -> dict[str, float]:
    """Loss, accuracy and sample count over every batch of every rank: each utterance counted once.

    Ranks hold different numbers of evaluation batches (a rank may hold none), so instead of a per-batch
    `gather_for_metrics`, which would wait on ranks that have run out, each rank keeps running sums and
    one all-reduce combines them at the end. Counts are exact; the loss matches a one-process evaluation
    to float32 rounding (batches differ with the world size; tested to 1e-5 relative).
    `model` must not be a DDP wrapper, whose forward is a collective (pass the unwrapped model).

    Under DeepSpeed ZeRO-3 every forward is a collective; there `batches` comes from
    `spkdist.distributed.lockstep`, whose None items are idle passes: run on a one-frame dummy utterance
    of `idle_n_mels` bins, their result discarded, so that this rank joins the others' weight gathers.

    `details` (for the dashboards) also collects confusion counts and an embedding sample; every batch
    then returns its embeddings from the same forward pass (`with_embedding`), so no pass is added.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    # float64 where the device has it (MPS has not): the counts stay exact, the loss sum close
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(3, dtype=dtype, device=device)  # loss sum, correct, count
    for batch in batches:
        if batch is None:
            model(*idle_input(idle_n_mels, device))
            continue
        host_labels = batch.labels
        batch = batch.to(device)
        if (batch.labels < 0).any():
            raise SpkdistError(f"unlabeled utterance {batch.sources[0]} in an evaluation split")
        if details is None:
            logits = model(batch.mels, batch.lengths).float()  # (B, n_speakers), margin-free at eval
        else:
            logits, emb = model(batch.mels, batch.lengths, with_embedding=True)  # (B, N), (B, D)
            logits = logits.float()
            details.add(host_labels, batch.labels, logits.argmax(-1), emb)
        sums[0] += F.cross_entropy(logits, batch.labels, reduction="sum").to(dtype)
        sums[1] += (logits.argmax(-1) == batch.labels).sum()
        sums[2] += batch.labels.numel()
    model.train(was_training)
    loss_sum, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    if count == 0:
        raise SpkdistError("the evaluation split is empty")
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_samples": int(count)}


@torch.no_grad()
def embed(
    model: torch.nn.Module, batches: Iterable, device: torch.device, idle_n_mels: int | None = None
) -> list[tuple[str, str, np.ndarray]]:
    """(key, speaker name or '', L2-normalised embedding (D,)) per utterance of this rank's batches.

    `model` is unwrapped (see `evaluate`); None items of `batches` are ZeRO-3 idle passes, as there.
    """
    was_training = model.training
    model.eval()
    rows = []
    for batch in batches:
        if batch is None:
            model.embed(*idle_input(idle_n_mels, device))
            continue
        names = [name or "" for name in batch.speakers]
        batch = batch.to(device)
        vectors = F.normalize(model.embed(batch.mels, batch.lengths).float(), dim=1)  # (B, D)
        rows += zip(batch.keys, names, vectors.cpu().numpy(), strict=True)
    model.train(was_training)
    return rows


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, device: torch.device) -> list[tuple[int, str, int]]:
    """(order, source, predicted class id) per utterance, sorted back into the source's own order."""
    model.eval()
    rows = []
    for batch in batches:
        batch = batch.to(device)
        predicted = model(batch.mels, batch.lengths).argmax(-1).tolist()  # (B,)
        rows += zip(batch.orders, batch.sources, predicted, strict=False)
    return sorted(rows)
