"""Readers for `spkdist shard` inputs: an HW4 directory, an audio manifest, an audio folder tree, the demo.

Each reader checks everything it can without decoding a file (JSON structure, speakers, manifest lines,
duplicates) and returns a `Corpus`: the utterances in the input's own order, the speaker -> id map and a
description of the input for index.json. Decoding and feature checks happen later, per file, in the
shard workers (`spkdist.features`). Bad items go through `BadInput`: stop, or skip and record.

Inputs:
    HW4 dir      mapping.json, metadata.json, testdata.json, uttr-*.pt (see docs/hw4-format.md);
                 speaker2id is kept exactly; testdata.json becomes the unlabeled `test` split
    manifest     CSV or TSV with a header: `path,speaker` and optionally `split` (train, valid or test);
                 relative paths are resolved against a base directory (default: the manifest's own)
    folder tree  ROOT/<speaker>/**/*.wav|flac, all of it `train`
    FSDD demo    the embedded recordings as a manifest with the dataset's own split: takes 0-4 are
                 `test`, 5-49 `train`
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo import FSDD_ARCHIVE
from .errors import BadInput, BadItemError, SpkdistError
from .features import Precomputed
from .fsutil import sha256_file
from .shard_format import HELDOUT, SPLITS

HW4_FILES = ("mapping.json", "metadata.json", "testdata.json")
AUDIO_SUFFIXES = (".wav", ".flac")
MANIFEST_COLUMNS = ("path", "speaker", "split")
# The splits a manifest may name; `heldout` is made by `spkdist shard --heldout-speakers` only.
MANIFEST_SPLITS = tuple(split for split in SPLITS if split != HELDOUT)
# Member names in a shard are `<key>.json` / `<key>.npy` and must fit the 100-byte ustar name field.
MAX_KEY_LENGTH = 80
NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(slots=True)
class Utterance:
    """One input utterance, before its features are read."""

    key: str  # the sample key in the shards, unique within the corpus
    path: str  # the file to read (a str: pathlib would cost more than the rest of the record, here and
    # in the workers it is pickled to)
    source: str  # the path as the input names it; recorded in the sample's .json
    speaker: str | None  # None: unlabeled
    split: str  # "train" (valid may be carved from it), "valid" or "test"
    order: int  # position in the input's own order (HW4 test: the row of testdata.json)
    num_frames: int | None = None  # what the input's metadata claims (HW4 mel_len); checked against the file


@dataclass
class Corpus:
    """What a reader found: utterances in input order, speakers, and the input's description."""

    utterances: list[Utterance]
    speaker2id: dict[str, int]
    source: dict[str, Any]  # index.json "source": format, path, sha256 of the files that list the input
    precomputed: Precomputed | None = None  # the features' reader for .pt inputs; None: audio (log-mel)


def detect_format(location: Path, forced: str | None) -> str:
    """`hw4` or `audio` for a SOURCE path: `forced` if given, else `hw4` for a directory holding any of
    HW4's JSON files (so that a missing one is reported as such), else `audio`."""
    if not location.exists():
        raise SpkdistError(f"{location}: no such file or directory")
    if forced is not None:
        return forced
    return "hw4" if any((location / name).is_file() for name in HW4_FILES) else "audio"


def sample_key(name: str) -> str:
    """The shard sample key for an input path: the path without its suffix, every character outside
    [A-Za-z0-9_-] replaced by `_` (webdataset splits member names at the first dot). Long paths keep
    their tail plus a hash of the whole path."""
    key = NOT_KEY_CHARS.sub("_", os.path.splitext(name)[0])
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[-(MAX_KEY_LENGTH - 13) :]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return key


# ---------------------------------------------------------------------------------------------- HW4


def read_hw4(root: Path, bad: BadInput) -> Corpus:
    """The HW4 directory `root`: metadata.json -> labeled `train`, testdata.json -> unlabeled `test`."""
    if not root.is_dir():
        raise SpkdistError(f"{root}: not a directory (an HW4 input is a directory with mapping.json)")
    files = [root / name for name in HW4_FILES]
    mapping, metadata, testdata = (_read_json(path) for path in files)
    speaker2id = _hw4_speaker2id(mapping, files[0])
    n_mels = _hw4_n_mels(metadata, files[1])
    if _hw4_n_mels(testdata, files[2]) != n_mels:
        raise SpkdistError(f"{files[2]}: n_mels {testdata['n_mels']} differs from metadata.json's {n_mels}")
    speakers = _field(metadata, "speakers", dict, files[1])
    utterances = []
    for speaker, entries in speakers.items():
        if not isinstance(entries, list):
            raise SpkdistError(f"{files[1]}: speakers.{speaker} must be a list of utterances")
        for i, entry in enumerate(entries):
            utterance = _hw4_utterance(str(root), entry, f"{files[1]}: speakers.{speaker}[{i}]", bad)
            if utterance is None:
                continue
            if speaker not in speaker2id:
                bad.report(
                    BadItemError(utterance.path, f"speaker {speaker} (metadata.json) is not in mapping.json")
                )
                continue
            utterance.speaker, utterance.order = speaker, len(utterances)
            utterances.append(utterance)
    for i, entry in enumerate(_field(testdata, "utterances", list, files[2])):
        utterance = _hw4_utterance(str(root), entry, f"{files[2]}: utterances[{i}]", bad)
        if utterance is not None:
            utterance.split, utterance.order = "test", i
            utterances.append(utterance)
    return _corpus(utterances, speaker2id, "hw4", root, files, bad, Precomputed(n_mels))


def _hw4_speaker2id(mapping: Any, path: Path) -> dict[str, int]:
    speaker2id = _field(mapping, "speaker2id", dict, path)
    ids = list(speaker2id.values())
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(ids))):
        raise SpkdistError(f"{path}: speaker2id values must be the integers 0..{len(ids) - 1}, each once")
    if "id2speaker" in mapping and mapping["id2speaker"] != {str(i): name for name, i in speaker2id.items()}:
        raise SpkdistError(f"{path}: id2speaker is not the inverse of speaker2id")
    return speaker2id


def _hw4_n_mels(document: Any, path: Path) -> int:
    n_mels = _field(document, "n_mels", int, path)
    if n_mels <= 0:
        raise SpkdistError(f"{path}: n_mels must be positive, got {n_mels}")
    return n_mels


def _hw4_utterance(root: str, entry: Any, where: str, bad: BadInput) -> Utterance | None:
    """An utterance (speaker, split and order still to be set) from a metadata/testdata entry."""
    feature_path = entry.get("feature_path") if isinstance(entry, dict) else None
    mel_len = entry.get("mel_len") if isinstance(entry, dict) else None
    if not isinstance(feature_path, str) or not feature_path:
        bad.report(BadItemError(where, "entry has no feature_path"))
        return None
    path = os.path.join(root, feature_path)
    if mel_len is not None and (type(mel_len) is not int or mel_len < 0):
        bad.report(BadItemError(where, f"mel_len must be a non-negative integer, got {mel_len!r}"))
        return None
    if mel_len == 0:
        bad.report(BadItemError(path, "zero-length utterance (mel_len 0 in the metadata)"))
        return None
    return Utterance(sample_key(feature_path), path, feature_path, None, "train", 0, mel_len)


# ------------------------------------------------------------------------------------ audio inputs


def read_manifest(manifest: Path, base: Path | None, bad: BadInput) -> Corpus:
    """A CSV/TSV manifest; relative audio paths are resolved against `base` (default: its directory)."""
    base = manifest.parent if base is None else base
    lines = _read_text(manifest).splitlines()
    if not lines:
        raise SpkdistError(f"{manifest}: empty manifest (expected a header line `path,speaker[,split]`)")
    rows = csv.reader(lines, delimiter="\t" if "\t" in lines[0] else ",")
    header = [name.strip() for name in next(rows)]
    if not {"path", "speaker"} <= set(header) <= set(MANIFEST_COLUMNS) or len(set(header)) != len(header):
        raise SpkdistError(
            f"{manifest}: header {','.join(header)!r}, expected path,speaker and optionally split"
        )
    utterances = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        where = f"{manifest}:{rows.line_num}"
        if len(row) != len(header):
            bad.report(BadItemError(where, f"{len(row)} fields, the header has {len(header)}"))
            continue
        fields = {name: cell.strip() for name, cell in zip(header, row, strict=True)}
        split = fields.get("split", "train")
        if not fields["path"] or not fields["speaker"]:
            bad.report(BadItemError(where, "empty path or speaker"))
        elif split not in MANIFEST_SPLITS:
            bad.report(BadItemError(where, f"split {split!r} is not one of {', '.join(MANIFEST_SPLITS)}"))
        else:
            path = fields["path"]
            utterances.append(
                Utterance(
                    sample_key(path),
                    os.path.join(base, path),
                    path,
                    fields["speaker"],
                    split,
                    len(utterances),
                )
            )
    return _corpus(utterances, _speaker_ids(utterances), "audio-manifest", manifest, [manifest], bad)


def read_tree(root: Path, bad: BadInput) -> Corpus:
    """Audio files under ROOT/<speaker>/ (any depth), in sorted path order, all `train`."""
    utterances = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        name = path.relative_to(root).as_posix()
        if "/" not in name:
            bad.report(
                BadItemError(path, "audio file outside a speaker folder (expected ROOT/<speaker>/...)")
            )
            continue
        speaker = name.split("/", 1)[0]
        utterances.append(Utterance(sample_key(name), str(path), name, speaker, "train", len(utterances)))
    if not utterances:
        raise SpkdistError(f"{root}: no mapping.json (HW4) and no .wav/.flac files under ROOT/<speaker>/")
    return _corpus(utterances, _speaker_ids(utterances), "audio-tree", root, [], bad)


def read_fsdd_demo(workdir: Path, bad: BadInput) -> Corpus:
    """The embedded FSDD recordings, unpacked into `workdir`, read as a manifest with FSDD's own split."""
    with tarfile.open(FSDD_ARCHIVE) as archive:
        archive.extractall(workdir, filter="data")
    recordings = workdir / "recordings"
    lines = ["path,speaker,split"]
    for wav in sorted(recordings.glob("*.wav")):
        _digit, speaker, take = wav.stem.split("_")  # {digit}_{speaker}_{take}.wav
        lines.append(f"{wav.name},{speaker},{'test' if int(take) < 5 else 'train'}")
    manifest = recordings / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    corpus = read_manifest(manifest, None, bad)
    corpus.source = _describe("fsdd-demo", FSDD_ARCHIVE, [FSDD_ARCHIVE])
    return corpus


def _speaker_ids(utterances: list[Utterance]) -> dict[str, int]:
    """Class ids for audio inputs: speakers in sorted name order."""
    return {name: i for i, name in enumerate(sorted({u.speaker for u in utterances}))}


# ------------------------------------------------------------------------------------------ common


def _corpus(
    utterances: list[Utterance],
    speaker2id: dict[str, int],
    kind: str,
    location: Path,
    listing_files: list[Path],
    bad: BadInput,
    precomputed: Precomputed | None = None,
) -> Corpus:
    """The Corpus, after dropping (through `bad`) utterances whose key repeats an earlier one."""
    seen: dict[str, Utterance] = {}
    for utterance in utterances:
        if utterance.key in seen:
            first = seen[utterance.key]
            bad.report(BadItemError(utterance.source, f"listed twice (same sample key as {first.source})"))
        else:
            seen[utterance.key] = utterance
    return Corpus(list(seen.values()), speaker2id, _describe(kind, location, listing_files), precomputed)


def _describe(kind: str, location: Path, listing_files: list[Path]) -> dict[str, Any]:
    return {
        "format": kind,
        "path": str(location.resolve()),
        "sha256": {path.name: sha256_file(path) for path in listing_files},
    }


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheet exports add
    except FileNotFoundError:
        raise SpkdistError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpkdistError(f"{path}: cannot read ({e})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise SpkdistError(f"{path}: not valid JSON ({e})") from None


def _field(document: Any, name: str, kind: type, path: Path) -> Any:
    """document[name], which must be of `kind`; a SpkdistError naming the file otherwise."""
    value = document.get(name) if isinstance(document, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SpkdistError(f"{path}: needs a '{name}' field of type {kind.__name__}")
    return value
