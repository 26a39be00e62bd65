"""`spkdist export`: a checkpoint as an ONNX model, with a parity check against PyTorch.

The graph takes `mels` (B, T, n_mels) float32, zero-padded, and `lengths` (B,) int64, with the batch and
time axes dynamic, and returns either the L2-normalised speaker embedding (B, D), as `spkdist embed`
writes it, or the classifier's logits (B, n_speakers), margin-free as at evaluation. Everything between
the features and the output is inside the graph: the padding mask, the per-utterance feature
normalisation (`model.feature_norm`), the masked pooling. So a padded batch gives every utterance the
outputs it gets alone, as in PyTorch; `check_parity` measures exactly that on three utterances of
different lengths, each alone and all three in one padded batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SpkdistError
from .infer import check_n_mels, load_trained_model
from .shard_format import decode_sample, load_index, read_tar_samples, shard_urls

OUTPUTS = ("embedding", "logits")
# Largest |ONNX - PyTorch| accepted, relative to the outputs' own scale (max |PyTorch output|, at least 1).
TOLERANCE = 1e-4


class Exported(nn.Module):
    """What the ONNX graph computes: the model in eval mode, to its embedding or its logits."""

    def __init__(self, model: nn.Module, what: str) -> None:
        super().__init__()
        self.model, self.what = model.eval(), what

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.what == "embedding":
            return nn.functional.normalize(self.model.embed(mels, lengths), dim=1)  # (B, D)
        return self.model(mels, lengths)  # (B, n_speakers)


def export(checkpoint: str, out: str, what: str, shards: str | None, split: str) -> dict[str, Any]:
    """Write the ONNX model of `checkpoint` to `out` (atomically) and return the parity report."""
    try:
        import onnxruntime
    except ImportError:
        raise SpkdistError(
            "spkdist export needs onnx, onnxscript and onnxruntime: pip install 'spkdist[export]'"
        ) from None
    model, payload = load_trained_model(checkpoint)
    exported = Exported(model, what)
    n_mels = payload["n_mels"]
    example = (torch.zeros(2, 16, n_mels), torch.tensor([16, 9]))
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=2)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        with quiet_exporter():
            torch.onnx.export(
                exported,
                example,
                tmp,
                input_names=["mels", "lengths"],
                output_names=[what],
                dynamic_shapes={"mels": {0: batch, 1: time}, "lengths": {0: batch}},
                external_data=False,
                dynamo=True,
            )
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        utterances, source = parity_utterances(shards, split, n_mels)
        report = check_parity(exported, session, utterances)
        if report["max_abs_diff"] > TOLERANCE * max(1.0, report["output_scale"]):
            raise SpkdistError(
                f"{out}: the ONNX model differs from PyTorch by {report['max_abs_diff']:.3g} "
                f"(outputs of scale {report['output_scale']:.3g}); not written"
            )
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return {"out": str(out_path), "what": what, "inputs": source, **report}


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx without its progress lines (stdout), its warnings about naming the dynamic axes, and
    its log lines about operators of packages that are not installed (torchvision)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def parity_utterances(shards: str | None, split: str, n_mels: int) -> tuple[list[np.ndarray], str]:
    """Three utterances (frames, n_mels) of different lengths: the shortest, the median and the longest
    of the first shard of `split`, or without shards synthetic log-mel-like frames of 20, 150 and 600."""
    if shards is None:
        rng = np.random.default_rng(0)
        return [rng.normal(-6, 3, (t, n_mels)).astype(np.float32) for t in (20, 150, 600)], "synthetic"
    index = load_index(shards)
    check_n_mels(shards, index, n_mels)
    first = shard_urls(shards, index, split)[0]
    samples = sorted(
        (decode_sample(key, parts, n_mels).mels for key, parts in read_tar_samples(first)), key=len
    )
    if len(samples) < 3 or len(samples[0]) < 2:
        raise SpkdistError(f"{first}: fewer than 3 utterances of at least 2 frames for the parity check")
    picked = [samples[0], samples[len(samples) // 2], samples[-1]]
    return [
        np.array(s, dtype=np.float32) for s in picked
    ], f"{first} ({', '.join(str(len(s)) for s in picked)} frames)"


@torch.no_grad()
def check_parity(exported: Exported, session, utterances: list[np.ndarray]) -> dict[str, Any]:
    """Max |ONNX - PyTorch| over the utterances, each alone and all of them in one zero-padded batch,
    against PyTorch on each utterance alone."""
    reference = [exported(torch.from_numpy(u)[None], torch.tensor([len(u)]))[0].numpy() for u in utterances]
    diffs = []
    for u, ref in zip(utterances, reference, strict=True):
        (got,) = session.run(None, {"mels": u[None], "lengths": np.array([len(u)], np.int64)})
        diffs.append(float(np.abs(got[0] - ref).max()))
    padded = np.zeros((len(utterances), max(map(len, utterances)), utterances[0].shape[1]), np.float32)
    for row, u in enumerate(utterances):
        padded[row, : len(u)] = u
    lengths = np.array([len(u) for u in utterances], np.int64)
    (got,) = session.run(None, {"mels": padded, "lengths": lengths})
    batch_diff = float(np.abs(got - np.stack(reference)).max())
    return {
        "lengths": lengths.tolist(),
        "max_abs_diff_alone": diffs,
        "max_abs_diff_padded_batch": batch_diff,
        "max_abs_diff": max(*diffs, batch_diff),
        "output_scale": float(max(np.abs(r).max() for r in reference)),
    }


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX, with a parity check",
        description="Export a checkpoint's model to ONNX: inputs mels (B, T, n_mels) float32, zero-padded, "
        "and lengths (B,) int64, batch and time dynamic; output the L2-normalised embedding or the logits. "
        "Masking and feature normalisation are inside the graph. Then runs the ONNX model with onnxruntime "
        "on three utterances of different lengths, alone and as one padded batch, prints the largest "
        "difference from PyTorch as one JSON line, and refuses to write a model that differs by more than "
        f"{TOLERANCE:g} (relative to the outputs' scale). Needs pip install 'spkdist[export]'.",
        epilog="Example: spkdist export --checkpoint runs/boss --out boss.onnx --shards shards/hw4",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (its best)")
    p.add_argument("--out", required=True, help="the .onnx file to write (atomically)")
    p.add_argument("--what", choices=OUTPUTS, default="embedding", help="the graph's output")
    p.add_argument(
        "--shards", help="take the parity check's utterances from these shards (default: synthetic frames)"
    )
    p.add_argument("--split", default="valid", help="the split they come from")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    print(json.dumps(export(args.checkpoint, args.out, args.what, args.shards, args.split)))
