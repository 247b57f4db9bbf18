"""Per-step schedules (steps, not epoch guesses): warmup + cosine, and cosine-to-one momentum."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float
) -> float:
    """Linear warmup from ``peak / warmup_steps`` to ``peak``, then cosine down to ``final``.

    ``step`` is 0-based; the value applies to the update made at that step.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return final + (peak - final) * (math.cos(math.pi * progress) + 1) / 2


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's EMA schedule: ``m = final − (final − base) · (cos(π k / K) + 1) / 2``."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
