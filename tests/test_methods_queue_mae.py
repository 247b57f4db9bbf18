"""MoCo v2 (+ MoCHi) and MAE: golden tests vs literal loops, 2 processes vs 1, training, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.config import load_config
from pretrain.engine import EngineConfig, build_engine
from pretrain.losses.mae import mae_loss
from pretrain.methods import StepState, build_method
from pretrain.methods.mae import MAEConfig
from pretrain.methods.mocov2 import (
    MoCoV2Config,
    mochi_negatives,
    moco_queue_logits,
    moco_queue_loss,
)
from pretrain.metrics import read_metrics
from pretrain.modules.masking import patchify, random_masking, vit_forward_visible
from pretrain.modules.queue import KeyQueue
from pretrain.optim import build_optimizer
from pretrain.step import train_step
from pretrain.train import train
from tests.distributed import default_dtype, run_distributed

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"
B = 8


# ---------------------------------------------------------------- MoCo v2: queue and loss


def test_queue_enqueue_wraps_around_like_a_fifo() -> None:
    queue = KeyQueue(5, 2)
    slots = [None] * 5  # literal model: a ring of 5 slots and a write position
    pos = 0
    for n in (3, 3, 2, 7):
        keys = torch.randn(n, 2)
        queue.enqueue(keys)
        for row in keys:  # n > 5: later rows overwrite earlier ones
            slots[pos] = row
            pos = (pos + 1) % 5
        assert int(queue.ptr) == pos
        for i in range(5):
            if slots[i] is not None:
                assert torch.equal(queue.keys[i], slots[i]), (n, i)
    assert set(KeyQueue(4, 3).state_dict()) == {"keys", "ptr"}  # saved with the method


def literal_queue_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float, extra=None
) -> float:
    """MoCo eq. (1) as loops: -log exp(q·k+/T) / (exp(q·k+/T) + Σ_negatives exp(q·n/T))."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        pos = math.exp(float(qi @ ki) / t)
        negs = [queue[j] for j in range(queue.shape[0])]
        if extra is not None:
            negs += [extra[i, s] for s in range(extra.shape[1])]
        den = pos + sum(math.exp(float(qi @ n) / t) for n in negs)
        total += -math.log(pos / den)
    return total / q.shape[0]


def test_moco_queue_loss_matches_literal_loop() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, generator=g).double(), torch.randn(5, 4, generator=g).double()
    queue = F.normalize(torch.randn(9, 4, generator=g).double(), dim=1)
    got = float(moco_queue_loss(moco_queue_logits(q, k, queue, 0.2)))
    assert abs(got - literal_queue_loss(q, k, queue, 0.2)) < 1e-10


def test_mochi_negatives_are_unit_mixtures_of_the_hardest() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 6, generator=g).double()
    queue = F.normalize(torch.randn(20, 6, generator=g).double(), dim=1)
    extra = mochi_negatives(q, queue, n_hard=5, n1=7, n2=3)
    assert extra.shape == (4, 10, 6)
    torch.testing.assert_close(extra.norm(dim=2), torch.ones(4, 10, dtype=torch.float64))
    # N = 1: mixing the hardest negative with itself gives it back; the query mixes lie in the
    # plane of (q, hardest) with more weight on the negative (β < 0.5).
    one = mochi_negatives(q, queue, n_hard=1, n1=2, n2=4)
    qn = F.normalize(q, dim=1)
    for i in range(4):
        hardest = queue[max(range(20), key=lambda j: float(qn[i] @ queue[j]))]
        for s in range(2):
            torch.testing.assert_close(one[i, s], hardest)
        for s in range(2, 6):
            basis = torch.stack([qn[i], hardest], dim=1)  # [D, 2]
            coef = torch.linalg.lstsq(basis, one[i, s].unsqueeze(1)).solution.squeeze(1)
            torch.testing.assert_close(basis @ coef, one[i, s])
            assert 0 < coef[0] < coef[1]
    whole = mochi_negatives(q, queue, 5, 7, 3, torch.Generator().manual_seed(9))
    part = mochi_negatives(q[2:], queue, 5, 7, 3, torch.Generator().manual_seed(9), rows=(2, 4))
    torch.testing.assert_close(part, whole[2:])  # a rank's slice draws what one process would
    with_extra = moco_queue_loss(moco_queue_logits(q, q.flip(0), queue, 0.2, extra))
    assert abs(float(with_extra) - literal_queue_loss(q, q.flip(0), queue, 0.2, extra)) < 1e-10


# ---------------------------------------------------------------- MAE: masking and loss


def test_random_masking_keeps_len_keep_and_restores_order() -> None:
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    ids_keep, mask, ids_restore = random_masking(noise, 0.75)
    assert ids_keep.shape == (6, 4) and mask.shape == (6, 16)
    assert torch.equal(mask.sum(1), torch.full((6,), 12.0))
    for i in range(6):
        kept = sorted(range(16), key=lambda j: float(noise[i, j]))[:4]  # the 4 smallest
        assert ids_keep[i].tolist() == kept
        assert [j for j in range(16) if mask[i, j] == 0] == sorted(kept)
        shuffled = ids_keep.new_tensor(sorted(range(16), key=lambda j: float(noise[i, j])))
        assert shuffled[ids_restore[i]].tolist() == list(range(16))


def test_patchify_and_mae_loss_match_literal_loop() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8, generator=g).double()
    target = patchify(imgs, 4)  # [2, 4, 48]
    assert torch.equal(target[1, 2].view(4, 4, 3), imgs[1, :, 4:8, 0:4].permute(1, 2, 0))
    pred = torch.randn(2, 4, 48, generator=g).double()
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]]).double()
    for norm_pix in (True, False):
        total, count = 0.0, 0
        for i in range(2):
            for j in range(4):
                if mask[i, j] == 0:
                    continue
                t = target[i, j].tolist()
                if norm_pix:
                    mu = sum(t) / len(t)
                    var = sum((x - mu) ** 2 for x in t) / (len(t) - 1)
                    t = [(x - mu) / math.sqrt(var + 1e-6) for x in t]
                total += sum(
                    (p - x) ** 2 for p, x in zip(pred[i, j].tolist(), t, strict=True)
                ) / len(t)
                count += 1
        got = float(mae_loss(pred, target, mask, norm_pix))
        assert abs(got - total / count) < 1e-10


def test_vit_on_visible_tokens_equals_attention_masked_full_vit() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2).eval()
    imgs = torch.randn(3, 3, 16, 16)
    full = vit.forward_features(imgs)  # [3, 17, 192]
    everything = torch.arange(16).expand(3, 16)
    torch.testing.assert_close(vit_forward_visible(vit, imgs, everything), full)
    ids_keep, _, _ = random_masking(torch.rand(3, 16), 0.75)
    visible = vit_forward_visible(vit, imgs, ids_keep)  # [3, 5, 192]
    # Independent: the full ViT where every token may only attend to cls + visible tokens.
    allowed = torch.zeros(3, 17, dtype=torch.bool)
    allowed[:, 0] = True
    allowed.scatter_(1, ids_keep + 1, True)
    masked = vit.forward_features(imgs, attn_mask=allowed[:, None, None, :].expand(3, 1, 17, 17))
    picked = torch.cat(
        [masked[:, :1], masked[:, 1:].gather(1, ids_keep[..., None].expand(-1, -1, 192))], 1
    )
    torch.testing.assert_close(visible, picked, rtol=1e-4, atol=1e-5)


def test_single_view_maker_gives_one_normalised_crop() -> None:
    from PIL import Image

    from pretrain.data.views import AugConfig, view_maker

    img = Image.new("RGB", (40, 30), (255, 0, 0))
    aug = AugConfig(size=16, scale=(0.2, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    views = view_maker("single", aug)(img)
    assert len(views) == 1 and views[0].shape == (3, 16, 16)
    expected = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(views[0], expected)  # no colour augmentation


# ---------------------------------------------------------------- 2 processes × B/2 vs 1 × B


def make_method(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mocov2":
        backbone = build_backbone(BackboneConfig("resnet18", cifar_stem=True))
        cfg = MoCoV2Config(
            hidden_dim=32, dim=16, queue_size=12, momentum=0.9, mochi_n=6, mochi_n1=3, mochi_n2=2
        )
        return build_method(cfg, backbone)
    backbone = build_backbone(
        BackboneConfig("vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs={"depth": 1})
    )
    return build_method(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4), backbone)


def one_step(rank: int, world: int, name: str) -> dict:
    with default_dtype(torch.float64):
        return _one_step(rank, world, name)


def _one_step(rank: int, world: int, name: str) -> dict:
    method = build_engine(EngineConfig(), torch.device("cpu")).wrap(make_method(name))
    b = B // world
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(B, 3, 16, 16, generator=g)[rank * b : (rank + 1) * b] for _ in range(2)]
    state = StepState(step=3, total_steps=10)
    out = method(views, state)
    out.loss.backward()
    loss = out.loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(loss)
        loss /= world
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    method.after_step(state)
    queue = method.queue.keys.clone() if name == "mocov2" else None
    return {"loss": float(loss), "grads": grads, "queue": queue}


@pytest.mark.parametrize("name", ["mocov2", "mae"])
def test_two_processes_match_one(name: str) -> None:
    single = one_step(0, 1, name)
    ranks = run_distributed(one_step, 2, name)
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-10, (r["loss"], single["loss"])
        assert r["grads"].keys() == single["grads"].keys() and single["grads"]
        for n, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-7, atol=1e-10, msg=n)
        if name == "mocov2":
            torch.testing.assert_close(r["queue"], single["queue"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- training on CIFAR shards


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={shards}", f"run.dir={run_dir}", "checkpoint.every=100", *extra]


@pytest.mark.parametrize("name", ["mocov2", "mae"])
def test_debug_recipe_trains_20_steps(cifar_train_shards: Path, tmp_path: Path, name: str) -> None:
    result = train(load_config(RECIPES / f"{name}.yaml", overrides(cifar_train_shards, tmp_path)))
    assert result.finished and result.export_dir is not None
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # The export is the trained student backbone (MoCo v2: the query encoder; MAE: the encoder),
    # and it loads into a plain timm / torchvision model built from backbone.yaml.
    spec = yaml.safe_load((result.export_dir / "backbone.yaml").read_text())
    weights = load_file(result.export_dir / "backbone.safetensors")
    if name == "mae":
        timm.create_model(spec["timm_name"], **spec["timm_kwargs"]).load_state_dict(weights)
    state = torch.load(ckpt.latest_checkpoint(tmp_path) / "state.pt", weights_only=True)["model"]
    for key, value in weights.items():
        assert torch.equal(value, state[f"student.backbone.net.{key}"]), key


@pytest.mark.parametrize("symmetric", [False, True])
def test_mocov2_key_encoder_moves_by_ema_and_queue_takes_keys(symmetric: bool) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        RECIPES / "mocov2.yaml", ["method.queue_size=40", f"method.symmetric={symmetric}"]
    )
    method = build_method(cfg.method, build_backbone(cfg.backbone))
    engine = build_engine(EngineConfig(), torch.device("cpu"))
    method = engine.wrap(method)
    optimizer, _ = build_optimizer(cfg.optim, method.student, 16)
    old_teacher = {n: p.clone() for n, p in method.teacher.named_parameters()}
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
    with torch.no_grad():
        key_views = [views[1], views[0]] if symmetric else [views[1]]
        expected_keys = F.normalize(torch.cat(method.teacher(key_views)), dim=1)
    n_keys = expected_keys.shape[0]
    train_step(method, engine, optimizer, views, StepState(step=0, total_steps=20))
    m = cfg.method.momentum
    student = dict(method.student.named_parameters())
    for n, p in method.teacher.named_parameters():
        assert p.grad is None and not p.requires_grad
        torch.testing.assert_close(p, m * old_teacher[n] + (1 - m) * student[n].detach())
    assert int(method.queue.ptr) == n_keys == 16 * (2 if symmetric else 1)
    torch.testing.assert_close(method.queue.keys[:n_keys], expected_keys, rtol=1e-4, atol=1e-5)


RESUME_EXTRA = {
    # Queue of 40 keys, 16 per step: it wraps around (mid-batch) before the step-3 checkpoint;
    # MoCHi from step 1 draws from a generator seeded from (mochi_seed buffer, step).
    "mocov2": [
        "method.queue_size=40",
        "method.mochi_n=8",
        "method.mochi_n1=4",
        "method.mochi_n2=2",
        "method.mochi_start_step=1",
    ],
    "mae": [],  # masks from (noise_seed buffer, step)
}


@pytest.mark.parametrize("name", ["mocov2", "mae"])
def test_exact_resume(cifar_train_shards: Path, tmp_path: Path, name: str) -> None:
    """6 steps straight == 3 steps, stop, resume, 3 more: identical losses and final state."""
    recipe, steps = RECIPES / f"{name}.yaml", 6
    extra = [f"run.total_steps={steps}", *RESUME_EXTRA[name]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(recipe, overrides(cifar_train_shards, straight, *extra)))
    first = train(
        load_config(recipe, overrides(cifar_train_shards, resumed, *extra, "run.stop_after=3"))
    )
    assert first.last_step == 3 and not first.finished
    train(load_config(recipe, overrides(cifar_train_shards, resumed, *extra)))
    losses = [[(m["step"], m["loss"]) for m in read_metrics(d)] for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == steps
    state_a = torch.load(ckpt.latest_checkpoint(straight) / "state.pt", weights_only=True)
    state_b = torch.load(ckpt.latest_checkpoint(resumed) / "state.pt", weights_only=True)
    if name == "mocov2":
        assert int(state_a["model"]["queue.ptr"]) == (steps * 16) % 40
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
