"""Stop cleanly on a signal: every rank agrees on the step boundary, saves, and exits.

Slurm sends SIGUSR1 (``--signal`` of ``slurm/pretrain.sbatch``) or SIGUSR2 (submitit's) ahead
of a time limit and SIGTERM on preemption or ``scancel``. The handler only sets a flag; the training loop asks :meth:`StopRequest.agreed`
at every log step, which all-reduces the flag (MAX) so that all ranks stop after the same step,
write one checkpoint together and exit with :data:`EXIT_REQUEUE` for the launcher to requeue.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped early on request; resume by starting the same command
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """Installs handlers for SIGUSR1/SIGUSR2/SIGTERM; ``agreed()`` is collective when distributed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = False
        self.signal_name = ""
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal (one tiny all-reduce per call)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.flag
        t = torch.tensor([int(self.flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def restore(self) -> None:
        """Put the previous handlers back (so a later run in the same process starts clean)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
