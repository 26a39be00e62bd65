"""Run checkpoints: atomic step directories, `best`/`last` pointers, retention, and loading for inference.

Layout of a run directory:

    OUTPUT/checkpoints/step-00001200/   accelerator.save_state() files (model, optimizer, scheduler, scaler,
                                        RNG, train state) + model.pt (plain state dict + config) + meta.json
    OUTPUT/checkpoints/last -> step-00001200
    OUTPUT/checkpoints/best -> step-00000800

Every rank writes into `.step-XXXXXXXX.partial` and rank 0 renames it once all ranks are done, so a
crash mid-save leaves only a dot-directory that `latest` and inference never pick up. `model.pt` holds the
consolidated weights (DeepSpeed ZeRO shards gathered by `accelerator.get_state_dict`), so evaluation and
prediction load any checkpoint on CPU without DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .errors import SpkdistError

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
STEP_PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save(
    accelerator: Accelerator,
    model: torch.nn.Module,
    run_dir: str | Path,
    step: int,
    payload: dict[str, Any],
    keep_last: int,
    is_best: bool,
) -> Path:
    """Save a checkpoint of `step` on every rank (a collective call) and return its final path.

    `payload` (config, speakers, n_mels, metrics) is stored in model.pt beside the weights and, without
    the weights, in meta.json for people and scripts.
    """
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    partial = root / f".{step_name(step)}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save of this step
        partial.mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank must call it
    if accelerator.is_main_process:
        torch.save({**payload, "step": step, "state_dict": state_dict}, partial / MODEL_FILE)
        (partial / META_FILE).write_text(json.dumps({**payload, "step": step}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. a resumed run ending where it resumed)
            shutil.rmtree(final)
        os.replace(partial, final)
        _point(root / "last", final.name)
        if is_best:
            _point(root / "best", final.name)
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _point(link: Path, target: str) -> None:
    """Atomically make `link` a relative symlink to `target`."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints, never the one `best` points to."""
    best = (root / "best").resolve() if (root / "best").is_symlink() else None
    for old in step_checkpoints(root)[:-keep_last]:
        if old.resolve() != best:
            shutil.rmtree(old)


def step_checkpoints(root: Path) -> list[Path]:
    """Finished step checkpoints under `root`, oldest first."""
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / MODEL_FILE).is_file())


def find_resume_dir(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `latest` -> newest finished one in run_dir, or a path."""
    if resume == "latest":
        found = step_checkpoints(checkpoint_dir(run_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MODEL_FILE).is_file():
        raise SpkdistError(f"{resume}: not a finished checkpoint directory (no {MODEL_FILE})")
    return path


def check_resumable(path: Path, registered: int) -> None:
    """Refuse, in one line, a checkpoint whose training state does not match what this version saves:
    `registered` objects (loop counters, schedule). Checkpoints of spkdist before the device-side
    schedule (2026-12-01) hold one; their model.pt still serves evaluate and predict."""
    held = len(list(path.glob("custom_checkpoint_*.pkl")))
    if held != registered:
        raise SpkdistError(
            f"{path}: written by an earlier spkdist ({held} training-state objects, this version has "
            f"{registered}); it cannot be resumed, but evaluate and predict still read it"
        )


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from what users pass: a checkpoint itself, or a run directory (its best,
    else its last checkpoint)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for pointer in ("best", "last"):
        candidate = checkpoint_dir(path) / pointer
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise SpkdistError(f"{path}: not a checkpoint or a run directory with checkpoints")


def average(run_dir: str | Path, last: int, out: str | Path) -> Path:
    """Write a checkpoint (its model.pt and meta.json) whose weights are the mean of the newest `last`
    step checkpoints of `run_dir` (weight averaging, as speaker toolkits do at the end of training).
    Those are the newest finished step directories, which can include an older `best` kept by pruning;
    meta.json's `averaged_from` names them. BatchNorm statistics are averaged too, not recomputed.

    Floating tensors are averaged; integer ones (BatchNorm's num_batches_tracked) come from the newest.
    All must share the config's model section, the speakers and n_mels. Written atomically (a temporary
    directory renamed into place); `out` must not exist yet.
    """
    found = step_checkpoints(checkpoint_dir(run_dir))
    if last < 1 or len(found) < last:
        raise SpkdistError(f"{run_dir}: {len(found)} step checkpoints, cannot average the last {last}")
    chosen = found[-last:]
    payloads = [load_model_file(path) for path in chosen]
    newest = payloads[-1]
    for path, payload in zip(chosen, payloads, strict=True):
        same = (payload["config"]["model"], payload["speaker2id"], payload["n_mels"])
        if same != (newest["config"]["model"], newest["speaker2id"], newest["n_mels"]):
            raise SpkdistError(f"{path}: another model, speakers or n_mels than {chosen[-1]}; cannot average")
    state_dict = {}
    for name, tensor in newest["state_dict"].items():
        if tensor.is_floating_point():
            state_dict[name] = (
                sum(p["state_dict"][name].double() for p in payloads).div(last).to(tensor.dtype)
            )
        else:
            state_dict[name] = tensor
    out = Path(out)
    if out.exists():
        raise SpkdistError(f"{out}: exists; choose a new directory for the averaged checkpoint")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    meta = {key: value for key, value in newest.items() if key != "state_dict"}
    # the newest checkpoint's metrics were measured on other weights: these have none yet
    meta |= {"metrics": {}, "metrics_step": -1, "averaged_from": [path.name for path in chosen]}
    torch.save({**meta, "state_dict": state_dict}, partial / MODEL_FILE)
    (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(partial, out)
    return out


def load_model_file(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint's model.pt (weights, config, speakers), loaded onto CPU."""
    checkpoint = resolve(path)
    try:
        return torch.load(checkpoint / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpkdistError(f"{checkpoint / MODEL_FILE}: cannot be loaded ({type(e).__name__}: {e})") from None
