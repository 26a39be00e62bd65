"""Loss, accuracy and predictions over a whole split, for the trainer and `spkdist evaluate/predict`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .errors import SpkdistError


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: torch.nn.Module, batches: Iterable, lockstep_n_mels: int | None = None
) -> dict[str, float]:
    """Loss, accuracy and sample count over every batch of every rank, exactly.

    Ranks hold different numbers of evaluation batches (shards are split between them), so instead of a
    per-batch `gather_for_metrics`, which would wait on ranks that have run out, each rank keeps running
    sums and one all-reduce combines them at the end.

    Under DeepSpeed ZeRO-3 that is not enough: every forward pass gathers each layer's sharded weights from
    all ranks, so every rank must run the same number of them. Give `lockstep_n_mels` there: ranks then agree
    before each batch whether any of them still has one, and a rank that has run out runs an idle forward
    pass on a dummy input (its result is discarded) while the others finish.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=accelerator.device)  # loss sum, correct, count
    if lockstep_n_mels is not None:
        batches = _until_every_rank_is_done(accelerator, batches)
    for batch in batches:
        if batch is None:  # an idle pass on a one-frame dummy utterance: join the gathers, discard
            device = accelerator.device
            model(
                torch.zeros(1, 1, lockstep_n_mels, device=device),
                torch.ones(1, dtype=torch.long, device=device),
            )
            continue
        batch = batch.to(accelerator.device)
        if (batch.labels < 0).any():
            raise SpkdistError(f"unlabeled utterance {batch.sources[0]} in an evaluation split")
        logits = model(batch.mels, batch.lengths).float()  # (B, n_speakers), margin-free at eval
        sums[0] += F.cross_entropy(logits, batch.labels, reduction="sum")
        sums[1] += (logits.argmax(-1) == batch.labels).sum()
        sums[2] += batch.labels.numel()
    model.train(was_training)
    loss_sum, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    if count == 0:
        raise SpkdistError("the evaluation split is empty")
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_samples": int(count)}


def _until_every_rank_is_done(accelerator: Accelerator, batches: Iterable) -> Iterator:
    """This rank's batches, then None while any other rank still has one (a collective per item)."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any_rank(accelerator, batch is not None):
            return
        yield batch


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a collective: every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(
        accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item()
    )


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
