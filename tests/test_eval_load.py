"""``eval.load``: every accepted ``--backbone`` input loads to exactly the source weights.

Official layouts are written synthetically with the keys, prefixes, heads and extra entries of the
real files (see ``eval/formats.py`` for where each layout comes from), from a small perturbed
backbone; the loaded backbone must give identical features. Our own training checkpoints must
load to the same weights as their export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from eval.__main__ import main
from eval.arch import file_arch, infer_resnet
from eval.errors import EvalInputError
from eval.formats import load_file_backbone
from eval.load import (
    export_spec,
    file_sha256,
    load_backbone,
    resolve_source,
    weights_sha256,
)
from pretrain.backbones import RESNETS, Backbone, BackboneConfig, build_backbone
from pretrain.config import load_config
from pretrain.train import train
from tests.conftest import cifar_subset

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pretrain" / "recipes" / "debug"
RESNET = BackboneConfig(name="resnet18")
VIT = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8)
VIT_ARCH = "vit_tiny_patch16_224"  # img_size 32 / patch 8 are read from the weights' shapes
State = dict[str, torch.Tensor]


def perturbed(cfg: BackboneConfig, seed: int = 0) -> Backbone:
    """A backbone whose weights and BN running statistics are far from their initial values."""
    torch.manual_seed(seed)
    backbone = build_backbone(cfg)
    with torch.no_grad():
        for name, t in backbone.net.state_dict().items():
            if "running_var" in name:
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    return backbone.eval()


@pytest.fixture(scope="module")
def sources() -> dict[str, Backbone]:
    return {"resnet": perturbed(RESNET), "vit": perturbed(VIT)}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def features(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.eval()(x)


def prefixed(state: State, prefix: str) -> State:
    return {prefix + k: v for k, v in state.items()}


def shifted(state: State) -> State:
    """Other weights of the same shapes (a student, a momentum encoder)."""
    return {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}


def random_state(prefix: str, shapes: dict[str, tuple[int, ...]]) -> State:
    return {prefix + k: torch.randn(shape) for k, shape in shapes.items()}


def mlp_state(prefix: str, dims: list[int], last_affine: bool = False) -> State:
    """MoCo v3's ``_build_mlp``: Linear(no bias) + BN + ReLU ..., a last BN without affine."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=False))
        last = i == len(dims) - 2
        layers.append(nn.BatchNorm1d(b, affine=last_affine or not last))
        if not last:
            layers.append(nn.ReLU())
    return prefixed(nn.Sequential(*layers).state_dict(), prefix)


def optimizer_state() -> dict:
    return {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}


DINO_HEAD = {"mlp.0.weight": (32, 192), "mlp.0.bias": (32,), "mlp.2.weight": (16, 32),
             "mlp.2.bias": (16,), "last_layer.weight_g": (64, 1), "last_layer.weight_v": (64, 16)}  # fmt: skip
RESNET_DINO_HEAD = {k: (s[0], 512) if k == "mlp.0.weight" else s for k, s in DINO_HEAD.items()}


# Each layout: (family, build the file's object from the backbone state dict, --arch, suffixes).
def dino_checkpoint_vit(sd: State) -> dict:
    """main_dino.py save_dict; a ViT teacher is not DDP-wrapped, the student is."""
    return {
        "student": prefixed(shifted(sd), "module.backbone.")
        | random_state("module.head.", DINO_HEAD),
        "teacher": prefixed(sd, "backbone.") | random_state("head.", DINO_HEAD),
        "optimizer": optimizer_state(),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


def dino_checkpoint_resnet(sd: State) -> dict:
    """A ResNet teacher has batch norms, so main_dino.py wraps it in DDP: ``module.backbone.``."""
    head = RESNET_DINO_HEAD
    return {
        "student": prefixed(shifted(sd), "module.backbone.") | random_state("module.head.", head),
        "teacher": prefixed(sd, "module.backbone.") | random_state("module.head.", head),
        "optimizer": optimizer_state(),
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet18", patch_size=16, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    }


def released_backbone(sd: State) -> State:
    """dino_deitsmall16_pretrain.pth, dino_resnet50_pretrain.pth, Barlow Twins' and VICReg's
    resnet50.pth: the plain backbone (ResNets without ``fc``)."""
    return dict(sd)


def mae(sd: State) -> dict:
    """util/misc.py save_model of a models_mae.MaskedAutoencoderViT (decoder dim 128 here)."""
    decoder = {"mask_token": (1, 1, 128), "decoder_embed.weight": (128, 192),
               "decoder_embed.bias": (128,), "decoder_pos_embed": (1, 17, 128),
               "decoder_blocks.0.norm1.weight": (128,), "decoder_blocks.0.attn.qkv.weight": (384, 128),
               "decoder_norm.weight": (128,), "decoder_norm.bias": (128,),
               "decoder_pred.weight": (192, 128), "decoder_pred.bias": (192,)}  # fmt: skip
    return {
        "model": dict(sd) | random_state("", decoder),
        "optimizer": optimizer_state(),
        "epoch": 799,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75),
    }


def mocov3(sd: State, head_key: str, in_dim: int) -> dict:
    """main_moco.py: base / momentum encoders with the projector in ``fc`` or ``head``."""
    base = prefixed(sd, "module.base_encoder.")
    base |= mlp_state(f"module.base_encoder.{head_key}.", [in_dim, 64, 32])
    momentum = prefixed(shifted(sd), "module.momentum_encoder.")
    momentum |= mlp_state(f"module.momentum_encoder.{head_key}.", [in_dim, 64, 32])
    return {
        "epoch": 300,
        "arch": "vit_small" if head_key == "head" else "resnet18",
        "state_dict": base | momentum | mlp_state("module.predictor.", [32, 64, 32]),
        "optimizer": optimizer_state(),
        "scaler": {"scale": 65536.0},
    }


def mocov2(sd: State) -> dict:
    """moco/builder.py with mlp=True: ``encoder_q.fc`` = Linear, ReLU, Linear; queue buffers."""
    fc = {
        "fc.0.weight": (512, 512),
        "fc.0.bias": (512,),
        "fc.2.weight": (128, 512),
        "fc.2.bias": (128,),
    }
    return {
        "epoch": 800,
        "arch": "resnet18",
        "state_dict": prefixed(sd, "module.encoder_q.")
        | random_state("module.encoder_q.", fc)
        | prefixed(shifted(sd), "module.encoder_k.")
        | random_state("module.encoder_k.", fc)
        | {
            "module.queue": torch.randn(128, 256),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        },
        "optimizer": optimizer_state(),
    }


def swav_released(sd: State) -> State:
    """swav_800ep_pretrain.pth.tar: the DDP state dict with projection head and prototypes."""
    head = {"projection_head.0.weight": (64, 512), "projection_head.0.bias": (64,),
            "projection_head.1.weight": (64,), "projection_head.1.bias": (64,),
            "projection_head.1.running_mean": (64,), "projection_head.1.running_var": (64,),
            "projection_head.3.weight": (32, 64), "projection_head.3.bias": (32,),
            "prototypes.weight": (100, 32)}  # fmt: skip
    return prefixed(sd, "module.") | random_state("module.", head)


def swav_training(sd: State) -> dict:
    return {"epoch": 400, "state_dict": swav_released(sd), "optimizer": optimizer_state()}


def barlow_twins_training(sd: State) -> dict:
    """main.py checkpoint.pth: DDP(BarlowTwins) = backbone + projector + bn."""
    projector = mlp_state("module.projector.", [512, 64, 32])
    bn = prefixed(nn.BatchNorm1d(32, affine=False).state_dict(), "module.bn.")
    model = prefixed(sd, "module.backbone.") | projector | bn
    return {"epoch": 1000, "model": model, "optimizer": optimizer_state()}


def vicreg_training(sd: State) -> dict:
    """main_vicreg.py model.pth (here without num_batches_tracked, as older files have)."""
    backbone = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = prefixed(backbone, "module.backbone.") | mlp_state("module.projector.", [512, 64, 32])
    return {"epoch": 1000, "model": model, "optimizer": optimizer_state()}


def torchvision_classifier(sd: State) -> State:
    return dict(sd) | random_state("", {"fc.weight": (1000, 512), "fc.bias": (1000,)})


def timm_classifier(sd: State) -> State:
    return dict(sd) | random_state("", {"head.weight": (10, 192), "head.bias": (10,)})


LAYOUTS: dict[str, tuple[str, Callable[[State], dict], str | None, tuple[str, ...]]] = {
    "dino-checkpoint-vit": ("vit", dino_checkpoint_vit, None, (".pth",)),
    "dino-checkpoint-resnet": ("resnet", dino_checkpoint_resnet, None, (".pth",)),
    "dino-vit-backbone": ("vit", released_backbone, VIT_ARCH, (".pth", ".safetensors")),
    "resnet-backbone": ("resnet", released_backbone, None, (".pth", ".safetensors")),
    "mae": ("vit", mae, VIT_ARCH, (".pth",)),
    "mocov3-vit": ("vit", lambda sd: mocov3(sd, "head", 192), VIT_ARCH, (".pth.tar",)),
    "mocov3-resnet": ("resnet", lambda sd: mocov3(sd, "fc", 512), None, (".pth.tar",)),
    "mocov2": ("resnet", mocov2, None, (".pth.tar",)),
    "swav-released": ("resnet", swav_released, None, (".pth.tar", ".safetensors")),
    "swav-training": ("resnet", swav_training, None, (".pth",)),
    "barlow-twins-training": ("resnet", barlow_twins_training, None, (".pth",)),
    "vicreg-training": ("resnet", vicreg_training, None, (".pth",)),
    "torchvision": ("resnet", torchvision_classifier, "resnet18", (".pth", ".safetensors")),
    "timm": ("vit", timm_classifier, VIT_ARCH, (".pt", ".safetensors")),
}
CASES = [
    pytest.param(name, suffix, id=f"{name}{suffix}")
    for name, (_, _, _, suffixes) in LAYOUTS.items()
    for suffix in suffixes
]


def write(obj: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize(("layout", "suffix"), CASES)
def test_official_layout_loads_exactly(layout, suffix, sources, x, tmp_path):
    family, build, arch, _ = LAYOUTS[layout]
    source = sources[family]
    path = write(build(source.net.state_dict()), tmp_path / f"{layout}{suffix}")
    loaded, name = load_backbone(path, arch)
    assert name == f"{tmp_path.name}/{path.name}"
    assert loaded.cfg.name == source.cfg.name and loaded.cfg.img_size == source.cfg.img_size
    assert torch.equal(features(loaded, x), features(source, x))
    assert weights_sha256(path) == file_sha256(path) and export_spec(path) == {}


def test_layout_picks_teacher_and_base_encoder(sources, tmp_path):
    """The student / momentum encoder beside them hold other weights: the right one is taken."""
    sd = sources["resnet"].net.state_dict()
    dino = write(dino_checkpoint_resnet(sd), tmp_path / "dino.pth")
    moco = write(mocov3(sd, "fc", 512), tmp_path / "moco.pth")
    assert "teacher" in load_file_backbone(dino)[1]
    assert "base_encoder" in load_file_backbone(moco)[1]


def test_arch_wins_over_the_file_and_disagreement_is_logged(sources, x, tmp_path, caplog):
    path = write(mae(sources["vit"].net.state_dict()), tmp_path / "mae.pth")  # says ViT-B
    with caplog.at_level(logging.WARNING, logger="eval.formats"):
        loaded, _ = load_backbone(path, VIT_ARCH)
    assert "--arch vit_tiny_patch16_224 wins" in caplog.text
    assert torch.equal(features(loaded, x), features(sources["vit"], x))


def test_arch_arguments_and_explicit_shapes(tmp_path, x):
    source = perturbed(
        BackboneConfig(name=VIT_ARCH, img_size=32, patch_size=8, kwargs={"depth": 2})
    )
    path = write(timm_classifier(source.net.state_dict()), tmp_path / "deit.pth")
    loaded, _ = load_backbone(path, f"{VIT_ARCH}:depth=2")
    assert loaded.cfg.kwargs == {"depth": 2} and loaded.cfg.patch_size == 8
    assert torch.equal(features(loaded, x), features(source, x))
    with pytest.raises(EvalInputError, match=r"other shapes 1: pos_embed \(1, 17, 192\)"):
        load_backbone(path, f"{VIT_ARCH}:depth=2,img_size=64")  # --arch wins over the weights
    with pytest.raises(EvalInputError, match="expected NAME or NAME:key=value"):
        load_backbone(path, f"{VIT_ARCH}:depth")
    with pytest.raises(EvalInputError, match="--arch not_a_model"):
        load_backbone(path, "not_a_model")


def test_resnet_recognised_from_weights():
    for name in RESNETS:
        with torch.device("meta"):
            state = getattr(torchvision.models, name)().state_dict()
        assert infer_resnet(state) == BackboneConfig(name=name)
    cifar = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True)).net.state_dict()
    assert infer_resnet(cifar) == BackboneConfig(name="resnet18", cifar_stem=True)
    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2().state_dict()
    assert infer_resnet(wide) is None  # not a standard-width ResNet: needs --arch


def test_cifar_stem_resnet_file_without_arch(tmp_path, x):
    source = perturbed(BackboneConfig(name="resnet18", cifar_stem=True))
    path = write(torchvision_classifier(source.net.state_dict()), tmp_path / "r18.safetensors")
    loaded, _ = load_backbone(path)
    assert loaded.cfg.cifar_stem
    assert torch.equal(features(loaded, x), features(source, x))


def test_architecture_named_in_the_file():
    moco = file_arch({"arch": "vit_small", "state_dict": {}})
    assert moco is not None and moco[0].name == "vit_small_patch16_224"
    assert moco[0].kwargs == {"num_heads": 12}  # MoCo v3's ViT-S, unlike timm's 6 heads
    dino = file_arch({"args": argparse.Namespace(arch="deit_small", patch_size=8)})
    assert dino is not None and (dino[0].name, dino[0].patch_size) == ("vit_small_patch16_224", 8)
    mae_cfg = file_arch({"args": argparse.Namespace(model="mae_vit_large_patch16")})
    assert mae_cfg is not None and mae_cfg[0].name == "vit_large_patch16_224"
    assert file_arch({"arch": "vit_conv_small"}) is None  # no timm equivalent: ask for --arch


def test_missing_arch_is_a_clear_error(sources, tmp_path):
    path = write(timm_classifier(sources["vit"].net.state_dict()), tmp_path / "vit.pth")
    with pytest.raises(EvalInputError, match=r"holds a ViT .* pass --arch NAME") as exc:
        load_backbone(path)
    assert "\n" not in str(exc.value)
    other = write({"encoder.weight": torch.randn(4, 4)}, tmp_path / "other.pth")
    with pytest.raises(EvalInputError, match="not recognised from its weights: pass --arch"):
        load_backbone(other)


def test_unknown_layout_lists_missing_and_unexpected_keys(tmp_path):
    state = {f"trunk.stage{i}.weight": torch.randn(2, 2) for i in range(15)}
    path = write({"state_dict": state}, tmp_path / "unknown.pth")
    with pytest.raises(EvalInputError) as exc:
        load_backbone(path, "resnet18")
    msg = str(exc.value)
    assert "\n" not in msg and "no known layout fits resnet18" in msg
    assert "missing 100: conv1.weight, bn1.weight," in msg  # resnet18 keys, first 10 then a count
    assert "... (90 more)" in msg
    assert "unexpected 15: trunk.stage0.weight" in msg and "... (5 more)" in msg


def test_code_payload_is_refused_and_does_not_run(tmp_path):
    marker, control = tmp_path / "payload-ran", tmp_path / "control-ran"

    class Payload:
        def __init__(self, target: Path):
            self.target = target

        def __reduce__(self):
            return (os.system, (f"touch {self.target}",))

    weights = build_backbone(RESNET).net.state_dict()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": weights, "extra": Payload(marker)}, path)
    with pytest.raises(EvalInputError) as exc:
        load_backbone(path, "resnet18")
    msg = str(exc.value)
    assert "refused: loading it would run code from the file (it needs posix.system)" in msg
    assert "If you trust the file" in msg and "weights_only=False" in msg and "\n" not in msg
    assert not marker.exists()
    # The payload is live: an unrestricted load of the same kind of file does run it.
    torch.save({"extra": Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EvalInputError, match="not a readable PyTorch checkpoint"):
        load_backbone(garbage, "resnet18")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(EvalInputError, match="not a readable safetensors file"):
        load_backbone(bad, "resnet18")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="is neither an export directory"):
        load_backbone(tmp_path / "empty")


def test_checkpoint_directory_sha256_covers_shards(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-4"
    (step / "dcp").mkdir(parents=True)
    for name, data in [("state.pt", b"s"), ("meta.json", b"{}"), ("rank-0.pt", b"r"),
                       ("dcp/__0_0.distcp", b"a"), ("dcp/.metadata", b"m")]:  # fmt: skip
        (step / name).write_bytes(data)
    assert resolve_source(tmp_path / "run").path == step
    files = ["dcp/.metadata", "dcp/__0_0.distcp"]
    manifest = f"{file_sha256(step / 'state.pt')}  state.pt\n"
    manifest += "".join(f"{file_sha256(step / f)}  {f}\n" for f in files)
    assert weights_sha256(step) == hashlib.sha256(manifest.encode()).hexdigest()
    for name in files:
        (step / name).unlink()
    assert weights_sha256(tmp_path / "run") == file_sha256(step / "state.pt")  # DDP: state.pt


def test_training_checkpoint_loads_like_its_export(cifar_train_shards, tmp_path, x, caplog):
    """A tiny real DINO run: run directory, step directory and state.pt load the teacher that
    the run exported, bit for bit."""
    run_dir = tmp_path / "dino-run"
    overrides = [f"data.train={cifar_train_shards}", f"run.dir={run_dir}", "run.total_steps=3",
                 "checkpoint.every=100"]  # fmt: skip
    result = train(load_config(RECIPES / "dino.yaml", overrides))
    assert result.finished and result.export_dir == run_dir / "export"
    step = run_dir / "checkpoints" / "step-3"
    exported, _ = load_backbone(run_dir / "export")
    x16 = x[:, :, :16, :16]  # the debug recipe trains at 16 px
    for path in (run_dir, step, step / "state.pt"):
        loaded, name = load_backbone(path)
        assert name == "dino-run/step-3"
        assert loaded.cfg == exported.cfg
        for (key, a), b in zip(
            loaded.state_dict().items(), exported.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), key
        assert torch.equal(features(loaded, x16), features(exported, x16))
    assert export_spec(run_dir) == export_spec(run_dir / "export")
    assert weights_sha256(run_dir) == file_sha256(step / "state.pt")
    with caplog.at_level(logging.WARNING, logger="eval.load"):
        load_backbone(step, "resnet50")
    assert "--arch resnet50 ignored" in caplog.text


def test_cli_help_mentions_arch():
    proc = subprocess.run(
        [sys.executable, "-m", "eval", "knn", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps the help
    assert "[--arch NAME]" in text and "--arch NAME architecture of a checkpoint file" in text
    assert "num_heads=12" in text and "released checkpoint file" in text


def test_cli_knn_on_a_released_file(sources, tmp_path):
    """``knn --backbone FILE --arch NAME`` end to end: the record names the file and its sha."""
    data = tmp_path / "cifar10"
    cifar_subset(data / "train", "train", 3)
    cifar_subset(data / "test", "test", 1)
    path = write(timm_classifier(sources["vit"].net.state_dict()), tmp_path / "vit.safetensors")
    results = tmp_path / "results.jsonl"
    argv = ["knn", "--backbone", str(path), "--arch", VIT_ARCH, "--train", str(data / "train"),
            "--test", str(data / "test"), "--results", str(results), "--num-workers", "0",
            "--device", "cpu", "--k", "3"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(results.read_text())
    assert record["checkpoint"] == str(path.resolve())
    assert record["sha256"] == file_sha256(path)
    assert record["config"]["arch"] == VIT_ARCH and record["config"]["image_size"] == 32
