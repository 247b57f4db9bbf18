"""DeepSpeed ZeRO engine (stages 1, 2, 3) behind the :class:`Engine` interface.

``wrap`` prepares the plain method (sync-BN, device, channels-last except for the student,
whose parameters ZeRO keeps as contiguous views of flat buffers); ``attach_optimizer`` hands
``method.student`` and our torch optimizer to ``deepspeed.initialize`` (ZeRO partitions the
optimizer state, stage 2 also the gradients, stage 3 also the parameters) and installs the
DeepSpeed engine as the student runner. The teacher (EMA) and the method's buffers stay plain,
replicated modules outside DeepSpeed. At stages 1/2 every rank holds the whole updated student
after ``step``, so EMA updates read it directly; at stage 3 ``after_step`` runs with the
student's parameters gathered (one read-only all-gather per step).

Precision: fp32 → no mixed-precision block. bf16 → DeepSpeed's ``torch_autocast`` block: the
student's parameters (and ZeRO's master weights) stay fp32 and the forward runs under
``torch.autocast``, as under DDP (gradients reduced in fp32 unless ``engine.reduce_dtype=bf16``).
DeepSpeed's ``bf16`` block would cast the student to bf16 and switch the outer
``torch.autocast`` *off* inside its forward (``autocast_if_enabled``), so fp32 views would meet
bf16 weights and the fp32 EMA teacher would mix dtypes with the student. fp16 is refused: the
``fp16`` block has the same dtype problem, and ZeRO with ``torch_autocast`` fp16 clips the
still-scaled gradients and updates its GradScaler once per parameter group.

Refused (``ValueError`` before any work): methods that edit ``p.grad`` after backward (DINO's
last-layer freeze, SwAV's prototype freeze, Barlow Twins' ``bias_lr_ratio`` ≠ 1: under ZeRO the
gradients live in DeepSpeed's buffers) and SwAV (it renormalises its prototypes in place, which
ZeRO's fp32 master copy would overwrite).

LARS/LAMB: ZeRO steps our optimizer over flat fp32 partitions that concatenate slices of many
parameters; :func:`~pretrain.engine.zero_layout.zero_shard_layout` tells the optimizer which
parameter each stretch belongs to, so trust ratios use whole-parameter norms as under DDP.

Checkpoints: ``save_checkpoint`` writes ``<dir>/deepspeed/zero/`` (module states on rank 0,
one ``*_optim_states.pt`` per rank with its fp32 partition and optimizer state); rank 0's
``state.pt`` holds everything else of ``method.state_dict()`` under ``model_rest`` (teacher,
buffers such as DINO's center or MoCo v2's queue, the student's BN statistics and frozen
parameters). Resuming with another number of processes re-partitions the ZeRO state exactly
(:func:`~pretrain.engine.zero_layout.load_resharded`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.dist import detect_launch
from pretrain.engine.base import Engine, EngineConfig
from pretrain.engine.zero_layout import load_resharded, zero_shard_layout
from pretrain.methods.base import Method
from pretrain.modules.sync_bn import convert_sync_batchnorm

log = logging.getLogger(__name__)

TAG = "zero"  # DeepSpeed's checkpoint tag: files go to <checkpoint>/deepspeed/zero/
SUBDIR = "deepspeed"

# Methods whose ``on_after_backward`` edits ``p.grad`` of student parameters: under ZeRO the
# gradients live in DeepSpeed's flat buffers (``p.grad`` is None or about to be discarded), so
# the edit would be silently lost. The hook is a no-op when the setting has the neutral value.
GRAD_EDITING_SETTINGS = {
    "dino": ("freeze_last_layer_steps", 0),
    "swav": ("freeze_prototypes_steps", 0),
    "barlow_twins": ("bias_lr_ratio", 1.0),
}


def build_deepspeed_config(
    cfg: EngineConfig, micro_batch: int, world_size: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (``dtype``: the resolved precision), with
    ``cfg.deepspeed_config`` (a JSON file) merged over it recursively. No DeepSpeed scheduler:
    the loop sets lr on the param groups."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": cfg.zero_stage, "round_robin_gradients": False},
        "gradient_clipping": float(cfg.grad_clip or 0.0),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # no DeepSpeed progress lines: the loop logs
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        # fp32 parameters + torch.autocast (see the module docstring). An empty list of
        # "lower-precision-safe" modules keeps gradient reductions in fp32 (engine.reduce_dtype).
        autocast: dict[str, Any] = {"enabled": True, "dtype": "bfloat16"}
        if cfg.reduce_dtype == "fp32":
            autocast["lower_precision_safe_modules"] = []
        config["torch_autocast"] = autocast
    if cfg.deepspeed_config is not None:
        path = Path(cfg.deepspeed_config)
        try:
            override = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"engine.deepspeed_config: cannot read {path}: {e}") from e
        if not isinstance(override, dict):
            raise ValueError(f"engine.deepspeed_config: {path} must hold a JSON object")
        config = merge_config(config, override)
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ValueError(
            f"engine.deepspeed_config: zero_optimization.stage must be 1, 2 or 3, got {stage!r}"
        )
    if config["zero_optimization"].get("round_robin_gradients"):
        raise ValueError(
            "engine.deepspeed_config: round_robin_gradients reorders ZeRO's flat buffers; "
            "the LARS/LAMB shard layout and the EMA/export paths assume the plain order"
        )
    return config


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys, dictionaries merged recursively (new dict)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_supported(method_cfg: Any, method_cls: type[Method]) -> None:
    """Refuse (``ValueError``) the method settings that cannot work under ZeRO."""
    name = method_cfg.name
    if name == "swav":
        raise ValueError(
            "method.name: swav does not run with engine.name=deepspeed: it renormalises its "
            "prototypes in place every step (and freezes them by dropping their gradient), which "
            "ZeRO's separate fp32 master weights would undo; use engine.name=ddp or fsdp"
        )
    if name in GRAD_EDITING_SETTINGS:
        key, neutral = GRAD_EDITING_SETTINGS[name]
        value = getattr(method_cfg, key)
        if value != neutral:
            raise ValueError(
                f"method.{key}: must be {neutral} with engine.name=deepspeed (got {value}): "
                f"{name} applies it by editing student gradients after backward, and under ZeRO "
                "the gradients live in DeepSpeed's buffers, not in p.grad (engine.name=fsdp "
                "supports it)"
            )
    elif method_cls.on_after_backward is not Method.on_after_backward:
        raise ValueError(
            f"method.name: {name} edits gradients in on_after_backward, which ZeRO "
            "(engine.name=deepspeed) does not support; use engine.name=ddp or fsdp"
        )


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process (an in-memory one then) and
    ``LOCAL_RANK`` in the environment (torchrun sets it; a plain start does not)."""
    os.environ.setdefault("LOCAL_RANK", str(detect_launch().local_rank))
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedEngine(Engine):
    """ZeRO stage ``engine.zero_stage`` through ``deepspeed.initialize``; see the module doc."""

    name = "deepspeed"

    def __init__(self, cfg: EngineConfig, device: torch.device):
        super().__init__(cfg, device)
        if self.dtype == torch.float16:
            raise ValueError(
                "engine.precision: fp16 is not supported with engine.name=deepspeed (DeepSpeed's "
                "fp16 mode casts the student to half and disables torch.autocast inside it; its "
                "torch_autocast fp16 mode clips still-scaled gradients); use bf16"
            )
        self.ds: Any = None  # deepspeed.DeepSpeedEngine, after attach_optimizer
        self.base_optimizer: torch.optim.Optimizer | None = None

    @property
    def stage(self) -> int:
        return (
            int(self.ds.zero_optimization_stage()) if self.ds is not None else self.cfg.zero_stage
        )

    def wrap(self, method: Method) -> Method:
        check_supported(method.cfg, type(method))
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed and self.cfg.sync_bn:
            convert_sync_batchnorm(method, self.device)
        method.to(self.device)
        if self.cfg.channels_last:
            # Not the student: ZeRO keeps its parameters as contiguous views of flat buffers
            # (and DeepSpeed's initial broadcast needs contiguous ones). Inputs stay
            # channels-last, so convolutions still see that layout.
            for child in method.children():
                if child is not method.student:
                    child.to(memory_format=torch.channels_last)
        return method

    def attach_optimizer(self, method: Method, optimizer: torch.optim.Optimizer) -> Any:
        import deepspeed

        ensure_process_group(self.device)
        world = dist.get_world_size()
        micro = self.per_device_batch or 1
        config = build_deepspeed_config(self.cfg, micro, world, self.dtype)
        log.info("DeepSpeed config: %s", json.dumps(config, sort_keys=True))
        ds, zero_optimizer, _, _ = deepspeed.initialize(
            model=method.student, optimizer=optimizer, config=config
        )
        self.ds, self.base_optimizer = ds, optimizer
        if ds.optimizer.optimizer is not optimizer:
            raise RuntimeError("DeepSpeed did not keep our optimizer as ZeRO's base optimizer")
        if zero_optimizer.param_groups is not optimizer.param_groups:
            raise RuntimeError(
                "ZeRO's param_groups are not the base optimizer's: lr would not reach it"
            )
        method.set_student_runner(ds)
        self._set_shard_layout()
        if self.stage == 3:
            gather_student_for_after_step(method)
        return zero_optimizer

    def _set_shard_layout(self) -> None:
        if hasattr(self.base_optimizer, "shard_layout"):
            self.base_optimizer.shard_layout = zero_shard_layout(self.ds.optimizer, self.stage)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, optimizer: Any, params: list[nn.Parameter]) -> dict[str, float]:
        """ZeRO's step: reduce, clip by the global norm over all shards, step, zero, gather."""
        self.ds.step()
        logs: dict[str, float] = {}
        if self.cfg.grad_clip is not None:
            norm = self.ds.get_global_grad_norm()
            if norm is not None:
                logs["grad_norm"] = float(norm)
        return logs

    def save_state(self, method: Method, optimizer: Any, directory: Path) -> dict[str, Any]:
        """Collective: ZeRO files into ``directory/deepspeed``; the rest for ``state.pt``."""
        self.ds.save_checkpoint(str(directory / SUBDIR), tag=TAG)
        return {
            "model_rest": self._model_rest(method),
            "engine": {"zero_stage": self.stage, "world_size": dist.get_world_size()},
        }

    def load_state(
        self, method: Method, optimizer: Any, directory: Path, state: dict[str, Any]
    ) -> None:
        saved = state.get("engine", {})
        if saved.get("zero_stage", self.stage) != self.stage:
            raise ValueError(
                f"engine.zero_stage: {directory} was saved with ZeRO stage "
                f"{saved['zero_stage']}, this run uses {self.stage}; resume with "
                f"engine.zero_stage={saved['zero_stage']}"
            )
        saved_world = saved.get("world_size", dist.get_world_size())
        if saved_world != dist.get_world_size():
            log.info(
                "re-partitioning ZeRO stage %d state saved by %d processes for %d",
                self.stage,
                saved_world,
                dist.get_world_size(),
            )
            load_resharded(
                self.ds.optimizer,
                self.base_optimizer,
                self.stage,
                directory / SUBDIR / TAG,
                saved_world,
            )
        else:
            path, _ = self.ds.load_checkpoint(
                str(directory / SUBDIR),
                tag=TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise ValueError(f"{directory / SUBDIR}: no DeepSpeed checkpoint {TAG!r}")
        self._load_model_rest(method, state["model_rest"])
        self._set_shard_layout()  # ZeRO may have replaced its flat tensors

    def full_model_state(self, method: Method) -> dict[str, torch.Tensor] | None:
        """Collective at stage 3 (parameters gathered); CPU copies on rank 0."""
        with self._gathered(list(method.student.parameters())):
            if dist.get_rank() != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}

    def _gathered(
        self, params: list[nn.Parameter], modifier_rank: int | None = None
    ) -> contextlib.AbstractContextManager:
        """Full parameters inside the context at stage 3; nothing to do at stages 1/2."""
        if self.stage < 3:
            return contextlib.nullcontext()
        return gathered(params, modifier_rank)

    def _model_rest(self, method: Method) -> dict[str, torch.Tensor]:
        """``method.state_dict()`` without the student's trained parameters (DeepSpeed's)."""
        trained = trained_keys(method)
        frozen = [p for p in method.student.parameters() if not p.requires_grad]
        frozen_keys = {"student." + n for n, p in method.student.named_parameters()}
        frozen_keys -= trained
        with self._gathered(frozen):
            return {
                k: (v.detach().clone() if k in frozen_keys else v)
                for k, v in method.state_dict().items()
                if k not in trained
            }

    def _load_model_rest(self, method: Method, rest: dict[str, torch.Tensor]) -> None:
        trained = trained_keys(method)
        frozen = [p for p in method.student.parameters() if not p.requires_grad]
        with self._gathered(frozen, modifier_rank=0):
            missing, unexpected = method.load_state_dict(rest, strict=False)
        if unexpected or set(missing) != trained:
            raise ValueError(
                f"checkpoint model_rest does not match the method: missing "
                f"{sorted(set(missing) - trained)}, unexpected {sorted(unexpected)}"
            )


def gathered(
    params: list[nn.Parameter], modifier_rank: int | None = None
) -> contextlib.AbstractContextManager:
    """Stage 3: ``params`` whole inside the context (collective). Read-only (no
    ``modifier_rank``): only the partitioned ones, since leaving the context releases what it
    gathered, and DeepSpeed keeps small parameters whole on every rank (persistence threshold).
    With ``modifier_rank``, all of them: that rank's values are partitioned again on exit."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if modifier_rank is None:
        params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def trained_keys(method: Method) -> set[str]:
    """``method.state_dict()`` keys of the student parameters ZeRO trains."""
    return {"student." + n for n, p in method.student.named_parameters() if p.requires_grad}


def gather_student_for_after_step(method: Method) -> None:
    """Stage 3: ``after_step`` (EMA teachers) reads the student's parameters, which are
    partitioned; run it with them gathered (one all-gather of the student per step, read-only).
    Installed as an instance attribute over the class method."""
    if type(method).after_step is Method.after_step:
        return
    original = method.after_step
    params = list(method.student.parameters())

    def after_step(state):
        with gathered(params):
            return original(state)

    method.after_step = after_step  # type: ignore[method-assign]


def load_plain_model_state(directory: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full ``method.state_dict()`` of a DeepSpeed checkpoint without a process group:
    the fp32 student consolidated from the ZeRO files, the rest from ``state['model_rest']``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # print() and tqdm
        student = get_fp32_state_dict_from_zero_checkpoint(
            str(Path(directory) / SUBDIR), tag=TAG, exclude_frozen_parameters=True
        )
    log.debug("zero_to_fp32: %s", out.getvalue().strip())
    full = {"student." + k: v for k, v in student.items()}
    full.update(state["model_rest"])
    return full
