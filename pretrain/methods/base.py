"""The Method contract: what every self-supervised method declares and provides.

A method composes shared losses, heads and modules. It owns a ``student`` module group (trained,
called once per step through :meth:`run_student` so an engine can wrap it) and optionally a
``teacher`` (updated by EMA in :meth:`after_step`, never by the optimizer). It declares the
``views`` it needs; the data side builds them. It never calls backward and never wraps itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pretrain.backbones import Backbone


@dataclass
class MethodConfig:
    """Base of the per-method configs; ``name`` picks the concrete class from ``registry``."""

    name: str = ""
    registry: ClassVar[dict[str, type]] = {}


@dataclass
class StepState:
    """Where the run is: the step being trained (0-based) and the schedule length."""

    step: int
    total_steps: int


@dataclass
class LossOutput:
    """The loss to back-propagate, scalars to log, and (optionally) the embeddings ``[b, D]``
    the collapse monitor watches (std and effective rank of their normalised rows)."""

    loss: torch.Tensor
    logs: dict[str, Any] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None


class Method(nn.Module):
    """Thin base: view declaration, student/teacher groups, the wrapped-student hook."""

    views: ClassVar[str] = "two_view"
    student: nn.Module
    teacher: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.teacher = None  # teacher methods assign a module
        object.__setattr__(self, "_student_runner", None)

    def set_student_runner(self, runner: nn.Module) -> None:
        """Engines install the wrapped student (e.g. DDP) here; it is not a registered child,
        so ``state_dict()`` keys stay those of the plain modules."""
        object.__setattr__(self, "_student_runner", runner)

    def run_student(self, *args: Any) -> Any:
        """Call the student through the engine's wrapper: exactly once per training step."""
        runner = self._student_runner if self._student_runner is not None else self.student
        return runner(*args)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        raise NotImplementedError

    def on_after_backward(self, state: StepState) -> None:
        """Between backward and the optimizer step: e.g. drop the gradient of a layer that is
        frozen for the first steps (DINO's last layer, SwAV's prototypes)."""

    def after_step(self, state: StepState) -> dict[str, float]:
        """Called after every optimizer step (EMA updates, schedules). Returns values to log."""
        return {}

    def export_backbone(self) -> Backbone:
        """The backbone users evaluate: the teacher's for teacher methods, else the student's."""
        raise NotImplementedError
