"""The `spkdist` command line: parses arguments and dispatches to one function per subcommand.

Every subcommand is registered by an `add_<name>(commands)` function that creates its parser, documents
every option, and sets `run` to a function(args) -> exit code (None means 0). To add a command, write
such a function (here, or next to the code it runs) and append it to COMMANDS; benchmarks plug into
`spkdist bench` the same way through `spkdist.bench.BENCHMARKS`.

Errors the user can fix (bad input, missing files) are SpkdistError and end as one line on stderr,
`spkdist: error: <message>`, with exit code 2; a traceback always means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from . import __version__, bench, checkpoint, export, infer, open_set, train
from .argtypes import fraction, positive_float, positive_int
from .config import CONFIG_DIR
from .errors import BadInput, SpkdistError, exit_code
from .features import DTYPES, LogMel
from .fsutil import atomic_write_bytes
from .shard_format import load_index, verify
from .shard_run import ShardOptions, shard
from .sources import Corpus, detect_format, read_fsdd_demo, read_hw4, read_manifest, read_tree

DEMO_OUT = Path("shards/fsdd-demo")
DEMO_SHARD_SAMPLES = (
    200  # FSDD is small: several shards per split, so multi-worker/multi-rank loaders have work
)
LOG_MEL_OPTIONS = {  # option -> LogMel field, for audio inputs only
    "--sample-rate": ("sample_rate", "positive_int", "resample all audio to this rate, Hz"),
    "--win-ms": ("win_ms", "positive_float", "analysis window length, ms"),
    "--hop-ms": ("hop_ms", "positive_float", "hop between frames, ms"),
    "--n-mels": ("n_mels", "positive_int", "mel bins"),
    "--n-fft": ("n_fft", "positive_int", "FFT size (default: the next power of two >= the window)"),
    "--f-min": ("f_min", "float", "lowest mel filter frequency, Hz"),
    "--f-max": (
        "f_max",
        "positive_float",
        "highest mel filter frequency, Hz (default: half the sample rate)",
    ),
    "--log-floor": ("log_floor", "positive_float", "energies are clamped to this before the log"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spkdist", description="Speaker-identification training toolkit.")
    parser.add_argument("--version", action="version", version=f"spkdist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless there is none to show (None, False) or the help
    text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with `HelpFormatter`; the parsers of (nested) subcommands inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# -------------------------------------------------------------------------------------------- shard


def add_shard(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "shard",
        epilog="Example: spkdist shard /data/hw4/Dataset --out shards/hw4 --workers 8",
        help="convert a corpus into webdataset tar shards with index.json",
        description="Read a corpus (HW4 directory, audio manifest or folder tree, or the FSDD demo), "
        "split it into train/valid/test, shuffle (seeded) and write OUT/{split}-NNNNNN.tar shards and "
        "OUT/index.json. A rerun rebuilds OUT from scratch; index.json is written last, so a directory "
        "without it is unfinished.",
    )
    p.add_argument(
        "source",
        nargs="?",
        type=Path,
        metavar="SOURCE",
        help="HW4 directory (has mapping.json), audio folder tree ROOT/<speaker>/**/*.wav|flac, or a "
        "manifest file (CSV/TSV with columns path,speaker[,split])",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (with --demo: {DEMO_OUT})")
    p.add_argument("--demo", action="store_true", help="shard the embedded FSDD recordings (no SOURCE)")
    p.add_argument("--format", choices=("hw4", "audio"), help="input format (default: auto-detect)")
    p.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="read audio utterances from this manifest; its relative paths are resolved against SOURCE "
        "(default: the manifest's directory)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N", help="worker processes"
    )
    p.add_argument(
        "--valid-fraction",
        type=fraction,
        default=ShardOptions.valid_fraction,
        metavar="F",
        help="share of each speaker's train utterances held out as valid (unless the input has valid)",
    )
    p.add_argument(
        "--test-fraction",
        type=fraction,
        default=ShardOptions.test_fraction,
        metavar="F",
        help="share of each speaker's train utterances held out as a labeled test split, before valid is "
        "carved (unless the input has test)",
    )
    p.add_argument(
        "--heldout-speakers",
        metavar="F|FILE",
        help="keep speakers out of training for verification: a share F of them (seeded), or the names "
        "in FILE (one per line); all their utterances go to a labeled split `heldout`, and the classifier's "
        "speaker ids cover the other speakers only",
    )
    p.add_argument(
        "--seed", type=int, default=ShardOptions.seed, metavar="S", help="seed of split and shuffle"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unusable items and list them in index.json, instead of stopping at the first one",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=ShardOptions.dtype, help="feature dtype in the shards"
    )
    p.add_argument(
        "--shard-samples",
        type=positive_int,
        metavar="N",
        help=f"at most N samples per shard (default: {ShardOptions.max_shard_samples}, "
        f"{DEMO_SHARD_SAMPLES} with --demo)",
    )
    p.add_argument(
        "--shard-mb",
        type=positive_float,
        default=ShardOptions.max_shard_mb,
        metavar="MB",
        help="at most MB megabytes per shard",
    )
    features = p.add_argument_group("log-mel features (audio inputs only)")
    types = {"positive_int": positive_int, "positive_float": positive_float, "float": float}
    for option, (field, kind, text) in LOG_MEL_OPTIONS.items():
        default = LogMel.__dataclass_fields__[field].default
        features.add_argument(
            option, type=types[kind], help=text if default is None else f"{text} (default: {default})"
        )
    p.set_defaults(run=run_shard)


def run_shard(args: argparse.Namespace) -> None:
    bad = BadInput(skip=args.skip_bad)
    log_mel_args = {field: getattr(args, field) for field, _, _ in LOG_MEL_OPTIONS.values()}
    log_mel = LogMel(**{k: v for k, v in log_mel_args.items() if v is not None})
    with ExitStack() as stack:  # the demo's recordings are unpacked into a temporary directory
        if args.demo:
            if args.source or args.manifest or args.format:
                raise SpkdistError("--demo takes no SOURCE, --manifest or --format")
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="spkdist-fsdd-"))
            out, corpus = args.out or DEMO_OUT, read_fsdd_demo(Path(workdir), bad)
        elif args.out is None:
            raise SpkdistError("--out DIR is required (except with --demo)")
        else:
            out, corpus = args.out, _read_corpus(args, bad)
        if corpus.precomputed and any(v is not None for v in log_mel_args.values()):
            raise SpkdistError(
                f"{args.source}: log-mel options are for audio inputs; this is an HW4 directory"
            )
        default_samples = DEMO_SHARD_SAMPLES if args.demo else ShardOptions.max_shard_samples
        if args.valid_fraction + args.test_fraction >= 1:
            raise SpkdistError("--valid-fraction and --test-fraction must leave room for a train split")
        heldout_fraction, heldout_names = _heldout_speakers(args.heldout_speakers, corpus)
        options = ShardOptions(
            workers=args.workers,
            valid_fraction=args.valid_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            heldout_fraction=heldout_fraction,
            heldout_names=heldout_names,
            dtype=args.dtype,
            max_shard_samples=default_samples if args.shard_samples is None else args.shard_samples,
            max_shard_mb=args.shard_mb,
        )
        print(shard(corpus, corpus.precomputed or log_mel, out, options, bad))


def _heldout_speakers(value: str | None, corpus: Corpus) -> tuple[float, tuple[str, ...]]:
    """`--heldout-speakers F|FILE` as (fraction, names): a number in (0, 1), or a file of speaker names
    (one per line; blank lines and `#` comments skipped), each checked against the corpus."""
    if value is None:
        return 0.0, ()
    try:
        share = float(value)
    except ValueError:
        share = None
    if share is not None and not Path(value).exists():
        if not 0 < share < 1:
            raise SpkdistError(f"--heldout-speakers {value}: a share of the speakers must be in (0, 1)")
        return share, ()
    path = Path(value)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SpkdistError(f"{path}: cannot read the held-out speaker list ({e})") from None
    names = []
    for number, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name not in corpus.speaker2id:
            raise SpkdistError(f"{path}:{number}: speaker {name!r} is not in the corpus")
        if name in names:
            raise SpkdistError(f"{path}:{number}: speaker {name!r} is listed twice")
        names.append(name)
    if not names:
        raise SpkdistError(f"{path}: lists no speakers")
    return 0.0, tuple(names)


def _read_corpus(args: argparse.Namespace, bad: BadInput) -> Corpus:
    if args.manifest is not None:
        if args.format == "hw4":
            raise SpkdistError("--manifest lists audio files; it cannot be combined with --format hw4")
        return read_manifest(args.manifest, args.source, bad)
    if args.source is None:
        raise SpkdistError("give a SOURCE (or --manifest FILE, or --demo)")
    if detect_format(args.source, args.format) == "hw4":
        return read_hw4(args.source, bad)
    return read_manifest(args.source, None, bad) if args.source.is_file() else read_tree(args.source, bad)


# ------------------------------------------------------------------------------------ verify, inspect


def add_verify(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "verify",
        epilog="Example: spkdist verify shards/hw4",
        help="re-read every shard and check it against index.json",
        description="Re-read every shard of DIR: size and sha256 against index.json, every sample decodes "
        "to finite (frames, n_mels) features matching its metadata, sample counts per shard and split. "
        "Prints each problem and exits non-zero if there is any.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="shard directory (holds index.json)")
    p.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> None:
    problems = verify(args.dir)
    for problem in problems:
        print(problem)
    if problems:
        raise SpkdistError(f"{args.dir}: {len(problems)} problem(s) found")
    index = load_index(args.dir)
    shards = sum(len(info["shards"]) for info in index["splits"].values())
    samples = sum(info["num_samples"] for info in index["splits"].values())
    print(f"{args.dir}: OK, {shards} shards and {samples:,} samples match index.json")


def add_inspect(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        epilog="Example: spkdist inspect shards/hw4",
        help="summarise a shard directory",
        description="Print what index.json of DIR records: source, features, speakers, splits, skipped.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="shard directory (holds index.json)")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> None:
    index = load_index(args.dir)
    source, features, speakers = index["source"], index["features"], list(index["speaker2id"])
    settings = ", ".join(f"{k}={v}" for k, v in features.items() if k not in ("kind", "n_mels", "dtype"))
    print(f"{args.dir}: {index['format']} v{index['format_version']}, by spkdist {index['tool_version']}")
    print(f"source:   {source['format']} {source['path']} (fingerprint {source['fingerprint'][:16]})")
    print(f"features: {features['kind']}, {features['n_mels']} mel bins, {features['dtype']}; {settings}")
    print(f"speakers: {len(speakers)} ({_first_names(speakers)})")
    if heldout := index["heldout_speakers"]:
        print(f"heldout:  {len(heldout)} speakers ({_first_names(heldout)})")
    print(f"{'split':<8}{'samples':>10}{'frames':>14}{'shards':>8}{'MB':>10}")
    for split, info in index["splits"].items():
        megabytes = sum(s["bytes"] for s in info["shards"]) / 1e6
        print(
            f"{split:<8}{info['num_samples']:>10,}{info['num_frames']:>14,}{len(info['shards']):>8}{megabytes:>10.1f}"
        )
    print(f"settings: {', '.join(f'{k}={v}' for k, v in index['settings'].items())}")
    print(f"skipped:  {len(index['skipped'])} bad items")
    for item in index["skipped"]:
        print(f"  {item['path']}: {item['reason']}")


def _first_names(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def add_average(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "average",
        help="average the weights of a run's last checkpoints into a new checkpoint",
        description="Write a checkpoint whose weights are the mean of the newest K step checkpoints of a "
        "run (model.pt and meta.json, usable by evaluate and predict; not resumable).",
        epilog="Example: spkdist average runs/boss --last 3 --out runs/boss/averaged",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN", help="a run directory (holds checkpoints/)")
    p.add_argument("--last", type=positive_int, default=3, metavar="K", help="checkpoints to average")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new checkpoint directory")
    p.set_defaults(run=lambda args: print(f"wrote {checkpoint.average(args.run_dir, args.last, args.out)}"))


def add_configs(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "configs",
        help="list the shipped configs, or copy them into a directory",
        description="List the experiment and Accelerate configs this installation ships (the recipes "
        "`--config NAME.yaml` finds, and the launch configs for `accelerate launch --config_file`), or copy "
        "them into DIR/configs to edit them or to launch from DIR (the DeepSpeed launch configs name their "
        "DeepSpeed JSON by the relative path configs/accelerate/).",
        epilog="Example: spkdist configs --copy . && accelerate launch --config_file "
        "configs/accelerate/ddp.yaml -m spkdist.train --config boss.yaml",
    )
    p.add_argument("--copy", type=Path, metavar="DIR", help="copy them into DIR/configs (never overwriting)")
    p.set_defaults(run=run_configs)


def run_configs(args: argparse.Namespace) -> None:
    names = [f.name for f in CONFIG_DIR.iterdir() if f.is_file()]
    names += [f"accelerate/{f.name}" for f in (CONFIG_DIR / "accelerate").iterdir()]
    files = sorted(names)
    if args.copy is None:
        print(f"{CONFIG_DIR}:")
        for name in files:
            print(f"  {name}")
        return
    target = args.copy / "configs"
    existing = [name for name in files if (target / name).exists()]
    if existing:
        raise SpkdistError(f"{target / existing[0]}: exists; copy into another directory")
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / name, CONFIG_DIR.joinpath(*name.split("/")).read_bytes())
    print(f"copied {len(files)} configs to {target}")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_shard,
    add_verify,
    add_inspect,
    train.add_command,
    infer.add_evaluate,
    infer.add_predict,
    add_average,
    open_set.add_commands,
    export.add_command,
    add_configs,
    bench.add_command,
]

if __name__ == "__main__":
    sys.exit(main())
