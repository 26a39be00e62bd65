"""What keeps the ranks of a job in step: one Accelerator per launch mode, the checks that every rank runs
the same job in one world, the stop agreement, buffer sync and ZeRO-3 lockstep.

The rule every helper here follows: a collective is called by every rank at the same point of the same
code path, or the job hangs until `train.collective_timeout`. Each function says when it is a collective.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
from collections.abc import Iterable, Iterator
from datetime import timedelta
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, gather_object

from .errors import SpkdistError

# Seconds a rank waits in a collective for the others where no config sets it (evaluate, predict, bench).
DEFAULT_COLLECTIVE_TIMEOUT = 600


def deepspeed_launch() -> bool:
    """True under a DeepSpeed `accelerate launch`; then check what Accelerate's DeepSpeed path needs.

    That path reads the `transformers` package metadata even without a transformers model: say how to
    fix it instead of failing deep inside Accelerate with PackageNotFoundError.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise SpkdistError(
            f"DeepSpeed launch, but {' and '.join(missing)} not installed: pip install -e '.[deepspeed]' "
            "(Accelerate's DeepSpeed integration needs the transformers package even though spkdist uses no "
            "transformers model)"
        )
    return True


def make_accelerator(collective_timeout: int, **kwargs: Any) -> Accelerator:
    """The one Accelerator of a process, for whatever `accelerate launch` asked, checked to be one world.

    `collective_timeout` (seconds) bounds every collective, joining included: a rank that dies or a node
    that never joins fails the job instead of hanging it. `kwargs` go to Accelerator.
    """
    use_deepspeed, on_cpu = deepspeed_launch(), not torch.cuda.is_available()
    process_group: dict[str, Any] = {"timeout": timedelta(seconds=collective_timeout)}
    if use_deepspeed and on_cpu:
        # DeepSpeed on CPU: name gloo, or Accelerate sees no backend and reports a world of 1 on every rank
        process_group["backend"] = "gloo"
    accelerator = Accelerator(
        # Without a GPU, DDP must be told it runs on CPU: only then does a multi-process launch form one
        # gloo world (otherwise Accelerate quietly gives each process a world of its own). DeepSpeed must
        # not be: cpu=True silently swaps it for plain DDP.
        cpu=on_cpu and not use_deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(**process_group)],
        **kwargs,
    )
    check_world_size(accelerator)
    return accelerator


def leave_process_group() -> None:
    """Destroy the process group, if this process joined one. Every process that did must, success or
    failure: exiting with gloo's threads still running aborts the process (SIGABRT, exit code -6)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the launcher started N processes but they did not join one world of N.

    Two mis-launches are caught: the processes of a torchrun/DeepSpeed launch (WORLD_SIZE=N) that each
    formed a world of their own, and `accelerate launch --cpu --num_processes N`, which starts a single
    process (it sets MASTER_ADDR for the N it was asked for, but no WORLD_SIZE).
    """
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != accelerator.num_processes:
        raise SpkdistError(
            f"launched {launched} processes but Accelerate formed a world of {accelerator.num_processes}; "
            "check the accelerate launch flags (on CPU-only machines use --multi_gpu, not --cpu)"
        )
    simple_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if launched is None and simple_launch and "MASTER_ADDR" in os.environ:
        raise SpkdistError(
            "`accelerate launch --cpu --num_processes N` starts one process, not N: for N CPU processes "
            "use `accelerate launch --multi_gpu --num_processes N` (gloo DDP); for one, unset MASTER_ADDR "
            "if your environment exports it"
        )


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank. A collective with a host read: never per step."""
    if accelerator.num_processes == 1:
        return flag
    return bool(
        accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item()
    )


def job_description(config: dict[str, Any], index: dict[str, Any]) -> dict[str, str]:
    """What must be equal on every rank: each resolved config field, and a digest of index.json."""
    flat: dict[str, str] = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = json.dumps(value)
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    flat["index.json"] = digest
    return flat


def check_same_job(accelerator: Accelerator, description: dict[str, str]) -> None:
    """Fail on every rank, naming the first difference, unless all ranks describe the same job.

    Nodes launched with different overrides, or holding different local shards under one path, would
    otherwise train apart silently (or hang when their step counts differ). A collective, at start-up.
    """
    if accelerator.num_processes == 1:
        return
    ranks = gather_object([description])
    reference = ranks[0]
    for rank, other in enumerate(ranks[1:], start=1):
        for key in sorted(reference.keys() | other.keys()):
            mine, theirs = reference.get(key), other.get(key)
            if mine == theirs:
                continue
            if key == "index.json":
                raise SpkdistError(
                    f"rank {rank} reads a different index.json than rank 0 under data.shards "
                    f"(sha256 {theirs[:12]} vs {mine[:12]}): every node needs the same shards"
                )
            raise SpkdistError(
                f"rank {rank} runs a different job than rank 0: {key} is {theirs} there, {mine} on rank 0 "
                "(launch every node with the same config and overrides)"
            )


class StopRequest:
    """SIGTERM/SIGINT (a pre-empted job, Ctrl-C) become a request to checkpoint and exit cleanly.

    A context manager: the handlers are installed on entry, before anything slow happens, so a signal
    during start-up is a clean stop too, and the previous handlers come back on exit (an in-process run,
    in a test or a notebook, leaves Ctrl-C as it found it). A second SIGINT interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        """Why the ranks agreed to stop, as told to this rank: its own signal, or another rank's."""
        return self.signal_name or "a signal on another rank"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


class StopVote:
    """The ranks' agreement on when to stop, without stalling a step.

    Every step each rank casts its vote (did it get a signal?) with an asynchronous all-reduce on a gloo
    group of its own, over a CPU buffer, and reads the result of the previous step's vote: that reduce
    had a whole step to finish, so waiting for it costs nothing, and it touches neither the GPU stream nor
    the gradient all-reduces. All ranks read the same sum at the same step, so they stop together, one
    step after the signal. `poll` is a collective: every rank calls it once per step; `close` once at the
    end.
    """

    def __init__(self, accelerator: Accelerator, timeout_s: int) -> None:
        self._distributed = accelerator.num_processes > 1
        self._votes = np.zeros(1, dtype=np.float32)  # read as numpy: no tensor read-back at all
        self._buffer = torch.from_numpy(self._votes)
        self._pending: dist.Work | None = None
        self._group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            if (self._distributed)
            else None
        )

    def poll(self, requested: bool) -> bool:
        """Cast this step's vote; True once an earlier vote found a stop request on any rank."""
        if not self._distributed:
            return requested
        agreed = False
        if self._pending is not None:
            self._pending.wait()
            agreed = bool(self._votes[0] > 0)
        self._votes[0] = float(requested)
        self._pending = dist.all_reduce(self._buffer, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        """Wait for the last vote, so no rank leaves a collective behind."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank the same buffers (BatchNorm running statistics): their mean over the ranks.

    Each rank updates them from its own batches. DDP broadcasts rank 0's at the start of each training
    forward, but evaluation runs the unwrapped model on each rank's own share of the data (no DDP
    forward, whose broadcast would be a collective that ranks without a batch skip), and DeepSpeed never
    syncs them. Called before evaluating and before saving; a collective.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer, reduction="mean"))
        else:  # counters such as num_batches_tracked: equal anyway, rank 0's by definition
            buffer.copy_(accelerator.reduce(buffer * (accelerator.process_index == 0), reduction="sum"))


def is_zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


def lockstep(accelerator: Accelerator, batches: Iterable) -> Iterator:
    """This rank's batches, then None while any other rank still has one (a collective per item).

    For DeepSpeed ZeRO-3, where every forward pass gathers each layer's sharded weights from all ranks:
    every rank must run the same number of them, so a rank that has run out runs idle passes.
    """
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any_rank(accelerator, batch is not None):
            return
        yield batch
