"""The device data pipeline (``data.pipeline=device``) on the CPU: batched decode with CPU
fallbacks, the workers' bytes + parameters, and training runs through it (exact resume, corrupt
samples); GPU-marked tests run the same on CUDA."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.reader import decode_image as pil_decode
from pretrain.data.device_decode import decode_batch, is_jpeg, split_encoded
from tests.paths import CIFAR10


def encode(img: Image.Image, fmt: str, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def real_jpegs(n: int) -> list[bytes]:
    files = sorted((CIFAR10 / "train" / "airplane").iterdir())[:n]
    if len(files) < n:
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10}")
    return [f.read_bytes() for f in files]


def smooth_image(h: int, w: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = [np.sin(x / (5 + 3 * c) + g.uniform(0, 6)) + np.cos(y / (7 + c)) for c in range(3)]
    arr = (np.stack(rgb, -1) * 60 + 128).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_split_encoded_and_jpeg_sniffing():
    parts = [torch.arange(3, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8)]
    data, offsets = torch.cat(parts), torch.tensor([0, 3, 8])
    assert [p.tolist() for p in split_encoded(data, offsets)] == [p.tolist() for p in parts]
    img = smooth_image(8, 8, 0)
    assert is_jpeg(encode(img, "JPEG")) and not is_jpeg(encode(img, "PNG"))
    assert not is_jpeg(torch.tensor([0xFF], dtype=torch.uint8))


def test_decode_batch_matches_pil_and_falls_back_per_sample():
    """Real CIFAR JPEGs decode like PIL (both libjpeg-turbo: measured identical); a PNG, a
    grayscale JPEG and a CMYK JPEG take the fallbacks; garbage and a truncated JPEG body give
    None without losing the others' order."""
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in real_jpegs(3)]
    png_img, gray_img = smooth_image(20, 30, 1), smooth_image(17, 9, 2).convert("L")
    cmyk_img = smooth_image(12, 16, 3).convert("CMYK")
    truncated = encode(smooth_image(64, 64, 4), "JPEG")[:200]
    garbage = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    batch = [jpegs[0], encode(png_img, "PNG"), jpegs[1], encode(gray_img, "JPEG"), garbage,
             encode(cmyk_img, "JPEG"), truncated, jpegs[2]]  # fmt: skip
    out = decode_batch(batch, torch.device("cpu"))
    assert len(out) == len(batch) and out[4] is None and out[6] is None
    for i in (0, 2, 7):
        expected = as_tensor(pil_decode(batch[i].numpy().tobytes()))
        assert out[i].dtype == torch.uint8 and torch.equal(out[i], expected)
    assert torch.equal(out[1], as_tensor(png_img))
    assert out[3].shape == (3, 17, 9)
    assert torch.equal(out[3][0], out[3][1])  # grayscale expanded to RGB
    assert out[5].shape == (3, 12, 16)
    pil_cmyk = as_tensor(pil_decode(batch[5].numpy().tobytes())).float()
    assert (out[5].float() - pil_cmyk).abs().mean() < 3  # CMYK conversions differ slightly


@pytest.mark.gpu
def test_cuda_decode_matches_cpu_decode():
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in real_jpegs(16)]
    big = [encode(smooth_image(375, 500, s), "JPEG", quality=90) for s in range(4)]
    batch = jpegs + big + [encode(smooth_image(20, 30, 9), "PNG")]
    cpu = decode_batch(batch, torch.device("cpu"))
    gpu = decode_batch(batch, torch.device("cuda"))
    for c, g in zip(cpu, gpu, strict=True):
        assert g.is_cuda and g.shape == c.shape
        # nvJPEG and libjpeg-turbo differ by IDCT / chroma upsampling rounding only
        assert (g.cpu().float() - c.float()).abs().mean() < 2.0


@pytest.mark.gpu
def test_cuda_decode_leaves_memory_the_training_stream_still_reads_alone():
    """pytorch/vision#9606: decoded images written into blocks that kernels queued on the
    caller's stream still read. Victims the size of a decoded image are freed on the host while
    a queued sum still has to read them (behind a ~0.1 s sleep kernel); the decode must not land
    in them, so every queued sum still sees the victims' value."""
    device = torch.device("cuda")
    batch = [encode(smooth_image(96, 128, s), "JPEG", quality=90) for s in range(32)]
    corrupted = 0
    for _ in range(20):
        victims = [torch.full((3, 96, 128), 7, dtype=torch.uint8, device=device) for _ in batch]
        torch.cuda._sleep(100_000_000)  # the caller's stream is busy for a while
        sums = torch.stack([v.sum(dtype=torch.int64) for v in victims])  # queued behind it
        del victims  # freed on the host: their blocks are free for the caller's stream
        images = decode_batch(batch, device)
        corrupted += int((sums != 7 * 3 * 96 * 128).any())
        assert all(image is not None and image.is_cuda for image in images)
    assert corrupted == 0


@pytest.mark.gpu
def test_side_stream_outputs_are_ready_on_the_training_stream():
    """What a side stream made behind a ~0.05 s sleep kernel is complete when the training
    stream reads it right after the hand-over (it waits for the side stream)."""
    from pretrain.data.streams import handed_over

    device = torch.device("cuda")

    def make():
        torch.cuda._sleep(50_000_000)
        return [torch.full((1 << 20,), 3.0, device=device), None]

    for _ in range(5):
        made, missing = handed_over(make, device, "test")
        assert missing is None and made.sum().item() == 3.0 * (1 << 20)


# --- training through the device pipeline ---------------------------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"


def first_batch_views(
    shards: Path, pipeline: str, aug, kind: str, decode: str = "device"
) -> tuple[list, torch.Tensor]:
    from pretrain.data import TrainLoader
    from pretrain.data.pipeline import InputPipeline

    inputs = InputPipeline(kind, aug, pipeline, torch.device("cpu"), False, decode)
    loader = TrainLoader(shards, inputs.worker_fn, 8, 0, seed=5, rank=0, world_size=1,
                         shuffle_buffer=32)  # fmt: skip
    batch = next(iter(loader))
    return inputs.views(batch), batch["index"]


@pytest.mark.parametrize("method", ["dino", "simclr", "mae"])
def test_device_views_equal_worker_views_sample_for_sample(cifar_train_shards, method):
    """The same loader batch through both pipelines: same samples, and each view agrees with
    the CPU path's up to interpolation / uint8 rounding (the parameters are the same draws)."""
    from pretrain.config import load_config
    from pretrain.methods import METHODS

    cfg = load_config(RECIPES / f"{method}.yaml", [f"data.train={cifar_train_shards}"])
    kind = METHODS[method][0].views
    worker, idx_w = first_batch_views(cifar_train_shards, "workers", cfg.data.aug, kind)
    device, idx_d = first_batch_views(cifar_train_shards, "device", cfg.data.aug, kind)
    assert torch.equal(idx_w, idx_d) and len(worker) == len(device)
    std = torch.tensor(cfg.data.aug.std).view(1, 3, 1, 1)
    for w, d in zip(worker, device, strict=True):
        assert w.shape == d.shape and d.dtype == torch.float32
        diff = ((w - d) * std).abs()  # back in [0, 1] pixel units
        assert diff.mean() < 0.01, float(diff.mean())
    shuffled = ((worker[0] - device[0].roll(1, 0)) * std).abs().mean()
    assert shuffled > 0.05  # a mismatch of samples would be far larger


def test_worker_decode_gives_the_device_decodes_views(cifar_train_shards):
    """``data.decode=workers``: same samples, and (both decoders being libjpeg-turbo on the
    CPU here) exactly the same views as the batched decode."""
    from pretrain.config import load_config

    aug = load_config(RECIPES / "dino.yaml").data.aug
    by_device, idx_d = first_batch_views(cifar_train_shards, "device", aug, "multi_crop")
    by_workers, idx_w = first_batch_views(
        cifar_train_shards, "device", aug, "multi_crop", decode="workers"
    )
    assert torch.equal(idx_d, idx_w)
    assert all(torch.equal(a, b) for a, b in zip(by_device, by_workers, strict=True))


def test_decoded_views_ship_pixels_and_the_same_parameters():
    """The workers' half of ``data.decode=workers``: pixels as decoded, parameters identical
    to the bytes-only workers' for the same seed, a mixed-size batch through one flat buffer and
    back, and a body-corrupt JPEG raising (the stream then counts it as corrupt)."""
    from pretrain.data.batched_views import view_specs
    from pretrain.data.pipeline import DecodedViews, EncodedViews, split_pixels
    from pretrain.data.views import AugConfig

    specs = view_specs("two_view", AugConfig())
    payloads = [*real_jpegs(2), encode(smooth_image(40, 56, 1), "PNG").numpy().tobytes()]
    samples = []
    for seed, data in enumerate(payloads):
        torch.manual_seed(seed)
        samples.append(DecodedViews(specs)(data))
        torch.manual_seed(seed)
        _, params = EncodedViews(specs)(data)
        assert torch.equal(samples[-1][1], params)
        assert torch.equal(samples[-1][0], as_tensor(pil_decode(data)))
    batch = DecodedViews.collate(samples)
    assert batch["shapes"].tolist() == [[32, 32], [32, 32], [40, 56]]
    images = split_pixels(batch["pixels"], batch["shapes"])
    assert all(torch.equal(a, b) for a, (b, _) in zip(images, samples, strict=True))
    body_cut = encode(smooth_image(64, 64, 4), "JPEG").numpy().tobytes()[:200]
    with pytest.raises(Exception, match="(?i)truncated|incomplete"):
        DecodedViews(specs)(body_cut)


def test_training_through_the_device_pipeline_resumes_exactly(cifar_train_shards, tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.train import train
    from tests.launch import losses, overrides

    def run(run_dir: Path, *extra: str):
        args = overrides(cifar_train_shards, run_dir, 6, "data.pipeline=device",
                         "data.num_workers=1", *extra)  # fmt: skip
        return train(load_config(RECIPES / "simclr.yaml", args))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    assert not run(resumed, "run.stop_after=3").finished
    assert run(resumed).finished
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6
    a = torch.load(ckpt.latest_checkpoint(straight) / "state.pt", weights_only=True)["model"]
    b = torch.load(ckpt.latest_checkpoint(resumed) / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_a_body_corrupt_jpeg_is_replaced_and_counted(cifar_train_shards, tmp_path, caplog):
    """A JPEG whose header parses (the workers pass it) but whose body does not decode: the
    device decoder replaces it by another image of the batch and the run counts it."""
    import hashlib
    import json
    import shutil
    import tarfile

    from pretrain.config import load_config
    from pretrain.metrics import read_metrics
    from pretrain.train import train
    from tests.launch import overrides

    shards = tmp_path / "shards"
    shutil.copytree(cifar_train_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    first = shards / manifest["shards"][0]["name"]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpg = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg"))
    data = members[jpg][1]
    cut = data.index(b"\xff\xda") + 20  # headers and SOF intact, the scan data cut short
    members[jpg] = (members[jpg][0], data[:cut])
    with tarfile.open(first, "w") as tar:
        for member, payload in members:
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    info = manifest["shards"][0]
    info["bytes"], info["sha256"] = (
        first.stat().st_size,
        hashlib.sha256(first.read_bytes()).hexdigest(),
    )
    (shards / "manifest.json").write_text(json.dumps(manifest))
    steps = 20  # one epoch of 320 samples at batch 16: every sample once
    args = overrides(shards, tmp_path / "run", steps, "data.pipeline=device")
    with caplog.at_level("WARNING"):
        assert train(load_config(RECIPES / "simclr.yaml", args)).finished
    assert "undecodable sample" in caplog.text
    assert read_metrics(tmp_path / "run")[-1]["corrupt_samples"] >= 1
