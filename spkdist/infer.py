"""`spkdist evaluate` and `spkdist predict`: a trained checkpoint applied to a shard split.

Both read the checkpoint's model.pt (consolidated weights + the training config), so they work on CPU or
one GPU for checkpoints saved by any launch mode: one process, DDP, or DeepSpeed ZeRO-2/3.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .checkpoint import load_model_file
from .config import config_from_dict
from .errors import SpkdistError
from .evaluation import evaluate, predict
from .fsutil import atomic_write_bytes
from .models import build_model
from .shards import load_index
from .stream import eval_loader


def load_trained_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (or a run directory's best checkpoint) in eval mode, and its payload."""
    payload = load_model_file(path)
    cfg = config_from_dict(payload["config"], where=f"{path} (stored config)")
    model = build_model(cfg.model, n_mels=payload["n_mels"], n_speakers=len(payload["speaker2id"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def _prepare(checkpoint: str, shards: str, split: str, batch_size: int, num_workers: int):
    index = load_index(shards)
    model, payload = load_trained_model(checkpoint)
    if index["n_mels"] != payload["n_mels"]:
        raise SpkdistError(
            f"{shards}: features have {index['n_mels']} mel bins, the model expects {payload['n_mels']}"
        )
    accelerator = Accelerator()
    loader = eval_loader(
        shards, index, split, batch_size=batch_size, num_workers=num_workers, rank=0, world_size=1
    )
    return accelerator, accelerator.prepare_model(model, evaluation_mode=True), index, payload, loader


def run_evaluate(checkpoint: str, shards: str, split: str, batch_size: int, num_workers: int) -> dict:
    """Loss, accuracy and sample count of `checkpoint` on a labeled split."""
    accelerator, model, index, payload, loader = _prepare(checkpoint, shards, split, batch_size, num_workers)
    if index["speaker2id"] != payload["speaker2id"]:
        raise SpkdistError(f"{shards}: speaker ids differ from the ones the checkpoint was trained on")
    return evaluate(accelerator, model, loader)


def run_predict(checkpoint: str, shards: str, split: str, out: str, batch_size: int, num_workers: int) -> int:
    """Write `Id,Category` rows (source path, predicted speaker) in the split's original order."""
    accelerator, model, _, payload, loader = _prepare(checkpoint, shards, split, batch_size, num_workers)
    id2speaker = {i: name for name, i in payload["speaker2id"].items()}
    rows = predict(model, loader, accelerator.device)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Id", "Category"])
    writer.writerows((source, id2speaker[pred]) for _, source, pred in rows)
    atomic_write_bytes(out, text.getvalue().encode())
    return len(rows)


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate",
        help="accuracy and loss of a checkpoint on a labeled split",
        description="Evaluate a checkpoint on a shard split; prints one JSON object "
        "with accuracy, loss and num_samples.",
    )
    _add_common(p, default_split="valid")
    p.set_defaults(
        run=lambda a: print(
            json.dumps(run_evaluate(a.checkpoint, a.shards, a.split, a.batch_size, a.num_workers))
        )
    )


def add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="write Id,Category predictions for a split",
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
        help="a checkpoint directory (e.g. RUN/checkpoints/best) or a run directory (its best)",
    )
    p.add_argument("--shards", required=True, help="shard directory (or URL prefix) written by spkdist shard")
    p.add_argument("--split", default=default_split, help=f"split to use (default: {default_split})")
    p.add_argument("--batch-size", type=int, default=64, help="utterances per batch (default: 64)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes (default: 2)")


def _predict_and_report(args: argparse.Namespace) -> None:
    count = run_predict(args.checkpoint, args.shards, args.split, args.out, args.batch_size, args.num_workers)
    print(f"wrote {count} predictions to {args.out}", file=sys.stderr)
