"""Learning-rate schedules that live on the device, so a training step never waits for the host."""

from __future__ import annotations

import math
from typing import Any

import torch


class WarmupCosine:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `max_steps`.

    It counts *applied* optimizer steps: `step(finite)` advances only where `finite` is true, so a step
    skipped for a non-finite gradient leaves the learning rate where it was. The count and the learning
    rate are tensors on the device (the fused AdamW kernel takes a tensor learning rate), so deciding
    whether a step counted never reads a value back to the host. Registered for checkpointing with
    `accelerator.register_for_checkpointing`, so a resumed run continues the schedule.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, peak: float, warmup_steps: int, max_steps: int, device
    ) -> None:
        self.optimizer = optimizer
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.applied = torch.zeros((), dtype=torch.int64, device=device)
        self._set_lr()

    def factor(self, applied: torch.Tensor) -> torch.Tensor:
        """The schedule's multiplier of `peak` after `applied` steps (a float32 tensor)."""
        t = applied.float()
        warm = t / max(1, self.warmup_steps)
        progress = ((t - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)).clamp(0, 1)
        decay = 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(t < self.warmup_steps, warm, decay)

    def step(self, finite: torch.Tensor) -> None:
        """After an optimizer step: count it if `finite` (a bool tensor), and set the next learning rate."""
        self.applied += finite.to(torch.int64)
        self._set_lr()

    def _set_lr(self) -> None:
        lr = self.peak * self.factor(self.applied)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def last_lr(self) -> float:
        """The learning rate the next step uses (a host read: for log steps)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"applied": int(self.applied)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied.fill_(state["applied"])
        self._set_lr()
