"""Released checkpoint files of other code bases → a :class:`Backbone` (``--backbone FILE``).

**Reading.** ``.safetensors`` files (by suffix or header) load with ``safetensors``; anything else
with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain containers
(plus ``argparse.Namespace``, which DINO and MAE store as ``args``: it is rebuilt field by field
under the same rules, and runs no code). A pickle that needs any other global (a class of the
training code, ``os.system`` ...) is refused with :class:`EvalInputError` before anything in it
runs; the message says how to re-save the weights of a trusted file.

**Finding the backbone.** Each container (``teacher``, ``state_dict``, ``model``, the top level)
and key prefix (``module.backbone.``, ``backbone.``, ``module.base_encoder.``, ``base_encoder.``,
``module.encoder_q.``, ``encoder_q.``, ``module.``, none) is tried in that order; the first whose
keys and shapes equal the architecture's exactly, once the keys of projection / prediction heads
and decoders (``fc.``, ``head.``, ``projection_head.``, ``prototypes.``, ``projector.``,
``predictor.``, ``decoder_*``, ``mask_token``) are dropped, is loaded. Batch-norm
``num_batches_tracked`` counters may be absent (unused in eval mode). The layouts this covers, as
each method's public training code writes them:

- DINO training checkpoint: ``{"teacher": {"backbone.*" | "module.backbone.*", "head.*"},
  "student": {"module.backbone.*", ...}, "args": Namespace, ...}``; the teacher is taken (it is
  DDP-wrapped only for networks with batch norms) -- facebookresearch/dino ``main_dino.py``,
  ``vision_transformer.py``.
- DINO released backbones: a plain ViT state dict (timm names) or a torchvision ResNet-50 without
  ``fc`` (``dino_resnet50_pretrain.pth``) -- dino ``hubconf.py``.
- MAE: ``{"model": encoder (timm names) + "decoder_*" + "mask_token", "args": Namespace, ...}``
  -- facebookresearch/mae ``models_mae.py``, ``util/misc.py`` (``save_model``).
- MoCo v3: ``{"state_dict": {"module.base_encoder.*" (projection MLP in ``fc.*`` for ResNets,
  ``head.*`` for ViTs), "module.momentum_encoder.*", "module.predictor.*"}, "arch": ...}`` --
  facebookresearch/moco-v3 ``moco/builder.py``, ``main_moco.py``, ``main_lincls.py``, ``vits.py``.
- MoCo v2: ``{"state_dict": {"module.encoder_q.*" (MLP in ``fc.*``), "module.encoder_k.*",
  "module.queue", "module.queue_ptr"}, "arch": ...}`` -- facebookresearch/moco ``moco/builder.py``.
- SwAV: ``{"module.*" + "module.projection_head.*" + "module.prototypes.*"}`` (released), or that
  inside ``state_dict`` (training) -- facebookresearch/swav ``hubconf.py``, ``src/resnet50.py``.
- Barlow Twins, VICReg: released ``resnet50.pth`` = torchvision ResNet-50 keys without ``fc``;
  training checkpoints ``{"model": {"module.backbone.*", "module.projector.*", ...}}`` --
  facebookresearch/barlowtwins ``main.py``, ``hubconf.py``; facebookresearch/vicreg
  ``main_vicreg.py``, ``resnet.py``, ``hubconf.py``.
- timm and torchvision state dicts (the classifier ``head.*`` / ``fc.*`` is dropped).

The architecture to build comes from ``eval/arch.py`` (``--arch``, else what the file says,
else a ResNet recognised from its weights).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from eval.arch import choose_config, describe
from eval.errors import EvalInputError
from pretrain.backbones import Backbone, BackboneConfig, build_backbone

log = logging.getLogger(__name__)

CONTAINERS = ("teacher", "state_dict", "model", None)  # None: the file's top level
PREFIXES = (
    "module.backbone.",
    "backbone.",
    "module.base_encoder.",
    "base_encoder.",
    "module.encoder_q.",
    "encoder_q.",
    "module.",
    "",
)
HEADS = (
    "fc.",
    "head.",
    "projection_head.",
    "prototypes.",
    "projector.",
    "predictor.",
    "decoder_",
    "mask_token",
)
LAYOUT_NAMES = {
    ("teacher", "backbone."): "DINO checkpoint, teacher",
    ("teacher", "module.backbone."): "DINO checkpoint, teacher",
    ("state_dict", "module.base_encoder."): "MoCo v3, base encoder",
    ("state_dict", "module.encoder_q."): "MoCo v2, query encoder",
    ("model", "module.backbone."): "Barlow Twins / VICReg checkpoint, backbone",
    ("model", ""): "MAE-style {'model': ...}",
    ("state_dict", "module."): "SwAV training checkpoint",
    (None, "module."): "DDP state dict (SwAV)",
    (None, ""): "plain state dict",
}


@dataclass
class Candidate:
    """A state dict found in the file: ``file[container]`` keys under ``prefix``, prefix cut."""

    container: str | None
    prefix: str
    state: dict[str, torch.Tensor]

    @property
    def where(self) -> str:
        place = f"[{self.container!r}]" if self.container else "top level"
        keys = f"{place} {self.prefix}*"
        name = LAYOUT_NAMES.get((self.container, self.prefix))
        return f"{name}: {keys}" if name else keys


@dataclass
class KeyMatch:
    """How a candidate's keys and shapes compare with the model's."""

    candidate: Candidate
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    dropped: list[str]
    common: int

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def load_file_backbone(path: Path, arch: str | None = None) -> tuple[Backbone, str]:
    """Build the architecture and load the backbone weights found in checkpoint file ``path``;
    returns the backbone and where in the file its weights were."""
    obj = read_checkpoint_file(path)
    found = candidates(obj)
    if not found:
        raise EvalInputError(f"{path}: no state dict of tensors found (top level: {_preview(obj)})")
    cfg = choose_config(path, obj, [c.state for c in found], arch)
    try:
        backbone = build_backbone(cfg)
    except (TypeError, ValueError) as exc:
        raise EvalInputError(f"{path}: cannot build {describe(cfg)}: {exc}") from None
    expected = backbone.net.state_dict()
    matches = [match_keys(c, expected) for c in found]
    best = next((m for m in matches if m.exact), None)
    if best is None:
        raise EvalInputError(mismatch_message(path, cfg, max(matches, key=lambda m: m.common)))
    state = best.candidate.state
    # Absent num_batches_tracked counters keep the fresh model's value (unused in eval mode).
    backbone.net.load_state_dict({k: state.get(k, v) for k, v in expected.items()})
    log.info(
        "%s: %s from %s (%d head/decoder keys left out)",
        path.name,
        describe(cfg),
        best.candidate.where,
        len(best.dropped),
    )
    return backbone, best.candidate.where


def read_checkpoint_file(path: Path) -> Any:
    """The file's contents: safetensors, or a pickle that holds only data (else refused)."""
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
            raise EvalInputError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if _needs_code(reason):
            raise EvalInputError(refusal_message(path, reason)) from None
        raise EvalInputError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        raise EvalInputError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_line(exc)})"
        ) from None


def refusal_message(path: Path, reason: str) -> str:
    """Why a pickle was refused, and how to re-save a trusted one as plain weights."""
    found = re.search(r"GLOBAL ([\w.]+)", reason)
    needs = f" (it needs {found.group(1)})" if found else ""
    out = path.with_name(f"{path.name.split('.')[0]}-weights.pth")
    keep = "{k: v for k, v in c.items() if k in ('teacher', 'state_dict', 'model')} or c"
    return (
        f"{path}: refused: loading it would run code from the file{needs}; only tensors and "
        "plain containers are loaded. If you trust the file, re-save its weights once and pass "
        f"that file instead: python -c \"import torch; c = torch.load('{path}', "
        f"map_location='cpu', weights_only=False); torch.save({keep}, '{out}')\""
    )


def candidates(obj: Any) -> list[Candidate]:
    """Every (container, prefix) of ``obj`` that holds tensors, in the order they are tried."""
    found = []
    for container in CONTAINERS:
        d = obj if container is None else obj.get(container) if isinstance(obj, Mapping) else None
        if not isinstance(d, Mapping):
            continue
        for prefix in PREFIXES:
            state = {
                k[len(prefix) :]: v
                for k, v in d.items()
                if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)
            }
            if state:
                found.append(Candidate(container, prefix, state))
    return found


def match_keys(candidate: Candidate, expected: Mapping[str, torch.Tensor]) -> KeyMatch:
    state = candidate.state
    extra = [k for k in state if k not in expected]
    return KeyMatch(
        candidate=candidate,
        missing=[k for k in expected if k not in state and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in extra if not k.startswith(HEADS)],
        mismatched=[
            f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ],
        dropped=[k for k in extra if k.startswith(HEADS)],
        common=sum(k in expected for k in state),
    )


def mismatch_message(path: Path, cfg: BackboneConfig, m: KeyMatch) -> str:
    """One line: the closest candidate's missing / unexpected / misshapen keys (first 10 each)."""
    parts = [
        f"{path}: no known layout fits {describe(cfg)}; closest is {m.candidate.where} "
        f"({m.common} keys in common)",
        f"missing {len(m.missing)}: {_first(m.missing)}",
        f"unexpected {len(m.unexpected)}: {_first(m.unexpected)}",
    ]
    if m.mismatched:
        parts.append(f"other shapes {len(m.mismatched)}: {_first(m.mismatched)}")
    parts.append("check --arch NAME[:key=value,...]")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- small helpers


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by the header: 8-byte little-endian JSON length, then ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return head[8:9] == b"{" and 0 < size <= path.stat().st_size - 8


# Pickle opcodes that look up or call code.
CODE_OPCODES = {
    op[0]
    for op in (pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.REDUCE, pickle.INST, pickle.OBJ,
               pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.BUILD)
}  # fmt: skip


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that says what was refused."""
    found = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported [^\n]*)", str(exc))
    return found.group(1).strip() if found else _line(exc)


def _needs_code(reason: str) -> bool:
    """A global (a class or function of some module) or an opcode that would call one."""
    if "GLOBAL" in reason:
        return True
    found = re.search(r"Unsupported operand (\d+)", reason)
    return found is not None and int(found.group(1)) in CODE_OPCODES


def _first(items: list[str], n: int = 10) -> str:
    if not items:
        return "none"
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _preview(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"keys {_first([str(k) for k in obj])}"
    return type(obj).__name__
