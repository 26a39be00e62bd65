"""The device-side learning-rate schedule: its shape, skipped steps, and its checkpointed state."""

import itertools
import math

import pytest
import torch

from spkdist.schedules import WarmupCosine


def schedule(warmup: int = 4, max_steps: int = 12) -> WarmupCosine:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0, fused=True)
    return WarmupCosine(optimizer, peak=0.5, warmup_steps=warmup, max_steps=max_steps, device="cpu")


def test_linear_warmup_then_cosine_to_zero():
    s = schedule()
    lrs = [s.last_lr()]
    for _ in range(12):
        s.step(torch.tensor(True))
        lrs.append(s.last_lr())
    assert lrs[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert lrs[8] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # halfway down
    assert lrs[12] == pytest.approx(0.0, abs=1e-7)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # never rises after the peak


def test_a_skipped_step_does_not_advance_it():
    s = schedule()
    s.step(torch.tensor(True))
    before = s.last_lr()
    s.step(torch.tensor(False))
    assert s.last_lr() == before and int(s.applied) == 1


def test_its_state_restores_the_learning_rate():
    s = schedule()
    for _ in range(6):
        s.step(torch.tensor(True))
    restored = schedule()
    restored.load_state_dict(s.state_dict())
    assert s.state_dict() == {"applied": 6} and restored.last_lr() == s.last_lr()
