"""The open-set commands: `spkdist embed` (embeddings of a split), `spkdist trials` (a trial list) and
`spkdist score` (cosine or AS-norm scores, EER and minDCF). The scoring itself is
`spkdist.verification`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from .argtypes import nonnegative_int, positive_int
from .distributed import leave_process_group
from .errors import SpkdistError
from .evaluation import embed
from .fsutil import atomic_write_bytes
from .infer import prepare_inference
from .shard_format import load_index, split_speakers
from .verification import (
    Embeddings,
    asnorm,
    check_same_dim,
    cosine_scores,
    make_trials,
    read_trials,
    score_report,
    write_trials,
)


@torch.no_grad()
def run_embed(
    checkpoint: str,
    shards: str,
    split: str,
    out: str,
    batch_size: int,
    num_workers: int,
    per_speaker_mean: bool = False,
) -> int:
    """Write one L2-normalised embedding per utterance of `split` (whole utterances, batched by length),
    or with `per_speaker_mean` each speaker's mean (a cohort for AS-norm); under `accelerate launch` the
    ranks share the split and rank 0 writes. Returns the number of utterances embedded."""
    try:
        accelerator, model, _, _, loader = prepare_inference(
            checkpoint, shards, split, batch_size, num_workers
        )
        rows = embed(model, loader, accelerator.device)
        if accelerator.num_processes > 1:
            rows = gather_object(rows)
        if accelerator.is_main_process:
            embeddings = Embeddings.from_rows(rows)
            (embeddings.speaker_means() if per_speaker_mean else embeddings).save(out)
        accelerator.wait_for_everyone()
        return len(rows)
    finally:
        leave_process_group()


def run_score(
    embeddings: str, trials: str, norm: str, cohort: str | None, top_n: int, scores_out: str | None
) -> dict:
    """Score a trial list (norm none: cosine; asnorm: adaptive s-norm against `cohort`); the report."""
    if (norm == "asnorm") != (cohort is not None):
        raise SpkdistError("--norm asnorm and --cohort go together: AS-norm needs a cohort, cosine uses none")
    emb = Embeddings.load(embeddings)
    labels, enroll, test = read_trials(trials, emb)
    if norm == "none":
        scores = cosine_scores(emb.vectors, enroll, test)
    else:
        cohort_emb = Embeddings.load(cohort)
        check_same_dim(emb, cohort_emb, Path(embeddings), Path(cohort))
        scores = asnorm(emb.vectors, enroll, test, cohort_emb.vectors, top_n)
    if scores_out is not None:
        rows = zip(scores, enroll, test, strict=True)
        lines = "".join(f"{s:.6f} {emb.keys[e]} {emb.keys[t]}\n" for s, e, t in rows)
        atomic_write_bytes(scores_out, lines.encode())
    return score_report(scores, labels) | {"norm": norm}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `spkdist embed`, `spkdist trials` and `spkdist score`."""
    p = commands.add_parser(
        "embed",
        help="write a split's speaker embeddings (.npz)",
        description="Embed every utterance of a split with a checkpoint's encoder and pooling (whole "
        "utterances, L2-normalised): an .npz of keys, speakers and embeddings. Under accelerate launch "
        "the ranks share the split.",
        epilog="Example: spkdist embed --checkpoint runs/boss --shards shards/hw4 --split valid "
        "--out emb.npz",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint or run directory")
    p.add_argument("--shards", required=True, help="shard directory (or URL) written by spkdist shard")
    p.add_argument("--split", default="valid", help="split to embed")
    p.add_argument("--out", required=True, help=".npz file to write (atomically)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="utterances per batch")
    p.add_argument("--num-workers", type=nonnegative_int, default=2, help="data loader worker processes")
    p.add_argument(
        "--per-speaker-mean",
        action="store_true",
        help="write each speaker's mean embedding (renormalised, keyed by speaker): a cohort for --cohort",
    )
    p.set_defaults(run=_embed)

    p = commands.add_parser(
        "trials",
        help="write a seeded, speaker-balanced trial list",
        description="Pair utterances of a labeled split into `label enroll test` trials (1: same speaker): "
        "seeded, spread evenly over the speakers, no utterance paired with itself.",
        epilog="Example: spkdist trials --shards shards/hw4 --split valid --out trials.txt --targets 2000",
    )
    p.add_argument("--shards", required=True, help="shard directory (or URL) written by spkdist shard")
    p.add_argument("--split", default="valid", help="a labeled split")
    p.add_argument("--out", required=True, help="trials file to write (atomically)")
    p.add_argument("--targets", type=positive_int, default=1000, help="same-speaker trials")
    p.add_argument("--nontargets", type=positive_int, default=1000, help="different-speaker trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    p.set_defaults(run=_trials)

    p = commands.add_parser(
        "score",
        help="EER and minDCF of embeddings on a trial list",
        description="Score every trial by the cosine of its two embeddings (or adaptive s-norm: --norm "
        "asnorm --cohort) and print one JSON line: eer (where the miss and false-alarm rates cross, linearly "
        "interpolated between the two nearest thresholds) and its threshold, min_dcf at P_target 0.01 and "
        "0.05 (C_miss = C_fa = 1, normalised by the best trivial decision), and the trial counts.",
        epilog="Example: spkdist score --embeddings emb.npz --trials trials.txt --norm asnorm "
        "--cohort train_means.npz",
    )
    p.add_argument("--embeddings", required=True, help=".npz written by spkdist embed")
    p.add_argument("--trials", required=True, help="`label enroll_key test_key` lines")
    p.add_argument("--norm", choices=["none", "asnorm"], default="none", help="asnorm needs --cohort")
    p.add_argument("--cohort", help="cohort embeddings (.npz) for --norm asnorm (embed --per-speaker-mean)")
    p.add_argument("--top-n", type=positive_int, default=300, help="cohort scores per side in AS-norm")
    p.add_argument("--scores-out", help="also write `score enroll test` lines here")
    p.set_defaults(run=_score)


def _embed(args: argparse.Namespace) -> None:
    count = run_embed(
        args.checkpoint,
        args.shards,
        args.split,
        args.out,
        args.batch_size,
        args.num_workers,
        args.per_speaker_mean,
    )
    if PartialState().is_main_process:
        what = "each speaker's mean embedding" if args.per_speaker_mean else "one embedding each"
        print(f"embedded {count} utterances; wrote {what} to {args.out}")


def _trials(args: argparse.Namespace) -> None:
    keys, speakers = split_speakers(args.shards, load_index(args.shards), args.split)
    write_trials(args.out, make_trials(keys, speakers, args.targets, args.nontargets, args.seed))
    print(f"wrote {args.targets} target and {args.nontargets} non-target trials to {args.out}")


def _score(args: argparse.Namespace) -> None:
    report = run_score(args.embeddings, args.trials, args.norm, args.cohort, args.top_n, args.scores_out)
    print(json.dumps(report))
