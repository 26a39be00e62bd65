"""`spkdist evaluate` and `spkdist predict`: a trained checkpoint applied to a shard split.

Both read the checkpoint's model.pt (consolidated weights + the training config), so they work on CPU or
GPUs for checkpoints saved by any launch mode: one process, DDP, or DeepSpeed ZeRO-2/3. Under
`accelerate launch --multi_gpu --num_processes N` the ranks share the split and the results are exact
(sums all-reduced, predictions gathered to rank 0).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn

from .argtypes import nonnegative_int, positive_int
from .checkpoint import load_model_file
from .config import config_from_dict, migrate_config
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT, leave_process_group, make_accelerator
from .errors import SpkdistError
from .evaluation import evaluate, predict
from .fsutil import atomic_write_bytes
from .models import build_model
from .shard_format import HELDOUT, load_index
from .stream import eval_loader


def load_trained_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (or a run directory's best checkpoint) in eval mode, and its payload."""
    payload = load_model_file(path)
    stored = migrate_config(payload["config"], payload.get("config_version", 1))
    cfg = config_from_dict(stored, where=f"{path} (stored config)")
    model = build_model(cfg.model, n_mels=payload["n_mels"], n_speakers=len(payload["speaker2id"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


class PosteriorAverage(nn.Module):
    """An ensemble: the log of the mean of its models' posteriors, as logits (B, n_speakers).

    Its argmax is the ensemble's prediction and its cross-entropy the ensemble's loss; with one model
    it is that model's log-softmax, so the same predictions and loss.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        log_posteriors = torch.stack(
            [m(mels, lengths).float().log_softmax(-1) for m in self.models]
        )  # (K, B, N)
        return log_posteriors.logsumexp(dim=0) - math.log(len(self.models))  # (B, N)


def load_ensemble(checkpoints: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """One checkpoint's model, or several as a `PosteriorAverage`; the first one's payload. Refuses
    checkpoints whose speakers or n_mels differ from the first's, in one line naming it."""
    models, first = [], None
    for path in checkpoints:
        model, payload = load_trained_model(path)
        if first is not None and (payload["n_mels"], payload["speaker2id"]) != (
            first["n_mels"],
            first["speaker2id"],
        ):
            raise SpkdistError(
                f"{path}: its speakers or n_mels differ from {checkpoints[0]}'s; an ensemble needs the same"
            )
        models.append(model)
        first = first or payload
    return (models[0] if len(models) == 1 else PosteriorAverage(models).eval()), first


def check_n_mels(shards: str, index: dict[str, Any], n_mels: int) -> None:
    """The shards' features must have the mel bins the model was trained on."""
    if index["n_mels"] != n_mels:
        raise SpkdistError(f"{shards}: features have {index['n_mels']} mel bins, the model expects {n_mels}")


def prepare_inference(
    checkpoint: str | Sequence[str], shards: str, split: str, batch_size: int, num_workers: int
):
    """Model and loader for this process; under `accelerate launch` each rank takes its share of the split."""
    index = load_index(shards)
    model, payload = load_ensemble([checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    check_n_mels(shards, index, payload["n_mels"])
    accelerator = make_accelerator(DEFAULT_COLLECTIVE_TIMEOUT)
    loader = eval_loader(
        shards,
        index,
        split,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    # Not prepared: a DDP wrapper's forward is a collective, and ranks hold unequal numbers of batches.
    return accelerator, model.to(accelerator.device), index, payload, loader


def check_classifier_split(shards: str, split: str) -> None:
    """Evaluate and predict classify: the held-out speakers are no class of the model."""
    if split == HELDOUT:
        raise SpkdistError(
            f"{shards}: the {HELDOUT} split's speakers are not classes of the model; "
            "use spkdist embed and spkdist score for them"
        )


def run_evaluate(
    checkpoint: str | Sequence[str], shards: str, split: str, batch_size: int, num_workers: int
) -> dict:
    """Loss, accuracy and sample count of `checkpoint` (or an ensemble of several) on a labeled split,
    summed over all ranks."""
    check_classifier_split(shards, split)
    try:
        accelerator, model, index, payload, loader = prepare_inference(
            checkpoint, shards, split, batch_size, num_workers
        )
        if index["speaker2id"] != payload["speaker2id"]:
            raise SpkdistError(f"{shards}: speaker ids differ from the ones the checkpoint was trained on")
        return evaluate(accelerator, model, loader)
    finally:
        leave_process_group()


def run_predict(
    checkpoint: str | Sequence[str], shards: str, split: str, out: str, batch_size: int, num_workers: int
) -> int:
    """Write `Id,Category` rows (source path, predicted speaker) in the split's original order; several
    checkpoints predict as an ensemble (their posteriors averaged).

    Under `accelerate launch` every rank predicts its share and rank 0 writes all rows.
    """
    check_classifier_split(shards, split)
    try:
        accelerator, model, _, payload, loader = prepare_inference(
            checkpoint, shards, split, batch_size, num_workers
        )
        id2speaker = {i: name for name, i in payload["speaker2id"].items()}
        rows = predict(model, loader, accelerator.device)
        if accelerator.num_processes > 1:
            rows = sorted(gather_object(rows))
        if accelerator.is_main_process:
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["Id", "Category"])
            writer.writerows((source, id2speaker[pred]) for _, source, pred in rows)
            atomic_write_bytes(out, text.getvalue().encode())
        accelerator.wait_for_everyone()  # the file exists when any rank returns
        return len(rows)
    finally:
        leave_process_group()


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate",
        help="accuracy and loss of a checkpoint on a labeled split",
        epilog="Example: spkdist evaluate --checkpoint runs/boss --shards shards/hw4 --split valid",
        description="Evaluate a checkpoint on a shard split; prints one JSON object "
        "with accuracy, loss and num_samples.",
    )
    _add_common(p, default_split="valid")
    p.set_defaults(run=_evaluate_and_report)


def add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="write Id,Category predictions for a split",
        epilog="Example: spkdist predict --checkpoint runs/boss --shards shards/hw4 --out predictions.csv",
        description="Predict the speaker of every utterance of a split; writes the homework's submission CSV "
        "(Id = the utterance's feature_path or source path, Category = speaker name) in the split's order.",
    )
    _add_common(p, default_split="test")
    p.add_argument("--out", required=True, help="CSV file to write (atomically)")
    p.set_defaults(run=_predict_and_report)


def _add_common(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="a checkpoint directory (e.g. RUN/checkpoints/best) or a run directory (its best); several: "
        "an ensemble that averages their posteriors (same speakers and n_mels)",
    )
    p.add_argument("--shards", required=True, help="shard directory (or URL prefix) written by spkdist shard")
    p.add_argument("--split", default=default_split, help=f"split to use (default: {default_split})")
    p.add_argument("--batch-size", type=positive_int, default=64, help="utterances per batch (default: 64)")
    p.add_argument(
        "--num-workers", type=nonnegative_int, default=2, help="data loader worker processes (default: 2)"
    )


def _evaluate_and_report(args: argparse.Namespace) -> None:
    metrics = run_evaluate(args.checkpoint, args.shards, args.split, args.batch_size, args.num_workers)
    if PartialState().is_main_process:
        print(json.dumps(metrics))


def _predict_and_report(args: argparse.Namespace) -> None:
    count = run_predict(args.checkpoint, args.shards, args.split, args.out, args.batch_size, args.num_workers)
    if PartialState().is_main_process:
        print(f"wrote {count} predictions to {args.out}", file=sys.stderr)
