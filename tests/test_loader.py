"""The resumable shard stream and TrainLoader: coverage, determinism, exact resume, world-size
change, corrupt members, and the eval loader. Shards are written here from real CIFAR-10 JPEGs."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.manifest import Manifest, ShardInfo
from data_prep.reader import decode_image
from pretrain.data import (
    AugConfig,
    ShardStream,
    TrainLoader,
    ViewMaker,
    eval_loader,
    eval_transform,
    merge_states,
)
from tests.paths import CIFAR10

CIFAR = CIFAR10 / "train"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARD_SIZES = [50, 30, 45, 40, 35, 40]  # 240 samples, deliberately unequal
N = sum(SHARD_SIZES)
BATCH = 8


def cifar_jpegs(n: int) -> list[tuple[bytes, int]]:
    """``n`` (jpeg bytes, label) pairs, round-robin over classes; synthetic if CIFAR is absent."""
    if not CIFAR.is_dir():
        rng = np.random.default_rng(0)
        out = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            out.append((buf.getvalue(), i % 10))
        return out
    files = {c: sorted((CIFAR / c).glob("*.jpg")) for c in CLASSES}
    return [(files[CLASSES[i % 10]][i // 10].read_bytes(), i % 10) for i in range(n)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(out: Path, samples: list[dict], sizes: list[int]) -> Manifest:
    """Write ``samples`` (dicts of extension -> bytes) into tar shards of ``sizes`` + manifest."""
    out.mkdir(parents=True, exist_ok=True)
    infos, start = [], 0
    for s, size in enumerate(sizes):
        path = out / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in range(start, start + size):
                for ext, data in samples[key].items():
                    _add(tar, f"{key:09d}.{ext}", data)
        data = path.read_bytes()
        infos.append(ShardInfo(path.name, size, hashlib.sha256(data).hexdigest(), len(data)))
        start += size
    manifest = Manifest(shards=infos, classes=CLASSES)
    manifest.save(out)
    return manifest


def make_samples(n: int) -> list[dict]:
    return [
        {"jpg": jpg, "cls": str(label).encode(), "json": b"{}"} for jpg, label in cifar_jpegs(n)
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, make_samples(N), SHARD_SIZES)
    return out


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("few_shards")
    write_shards(out, make_samples(N), [90, 80, 70])  # 3 shards < 4 global workers
    return out


VIEWS = ViewMaker.two_view(AugConfig.simclr_cifar())


def loader(path: Path, workers: int = 0, rank: int = 0, world: int = 1, state=None) -> TrainLoader:
    return TrainLoader(path, VIEWS, BATCH, workers, seed=7, rank=rank, world_size=world,
                       shuffle_buffer=50, state=state)  # fmt: skip


def take(train_loader: TrainLoader, n: int) -> list[dict]:
    """The next ``n`` batches; the iterator is closed afterwards (workers shut down)."""
    it = iter(train_loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def pairs(batches: list[dict]) -> list[tuple[int, int]]:
    return [(int(e), int(i)) for b in batches for e, i in zip(b["epoch"], b["index"], strict=True)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("index", "epoch", "label", "skipped"):
            assert torch.equal(x[key], y[key]), key
        for vx, vy in zip(x["views"], y["views"], strict=True):
            assert torch.equal(vx, vy)  # bitwise


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_one_epoch_single_worker_covers_every_sample_once(shards):
    batches = take(loader(shards), N // BATCH + 1)
    b0 = batches[0]
    assert [tuple(v.shape) for v in b0["views"]] == [(BATCH, 3, 32, 32)] * 2
    assert b0["views"][0].dtype == torch.float32 and b0["label"].dtype == torch.long
    epoch0 = [i for e, i in pairs(batches) if e == 0]
    assert sorted(epoch0) == list(range(N))
    assert epoch0 != sorted(epoch0)  # shuffled
    assert batches[-1]["epoch"].tolist() == [1] * BATCH
    labels = {int(i): int(y) for b in batches for i, y in zip(b["index"], b["label"], strict=True)}
    assert all(labels[i] == i % 10 for i in range(N))


@pytest.mark.parametrize("fixture", ["shards", "few_shards"])
def test_two_ranks_two_workers_cover_epoch_once(fixture, request, caplog):
    path = request.getfixturevalue(fixture)
    seen = []
    for rank in range(2):  # 2 simulated ranks x 2 workers = 4 global workers
        seen += pairs(take(loader(path, workers=2, rank=rank, world=2), 26))
    counts = Counter(seen)
    assert max(counts.values()) == 1  # no (epoch, index) twice, across ranks and workers
    assert sorted(i for e, i in seen if e == 0) == list(range(N))
    if fixture == "few_shards":  # strided mode warns once (checked in-process)
        with caplog.at_level(logging.WARNING):
            next(ShardStream(path, VIEWS, BATCH, seed=7).batches(0, 4))
        assert "3 shards for 4 workers" in caplog.text


def test_fresh_loaders_are_identical(shards):
    assert_same_batches(take(loader(shards, workers=2), 5), take(loader(shards, workers=2), 5))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_across_epoch_boundary(shards, workers):
    k, m = 25, 10  # 30 batches per epoch: the continuation crosses into epoch 1
    reference = take(loader(shards, workers), k + m)
    first = loader(shards, workers)
    assert pairs(take(first, k)) == pairs(reference[:k])
    state = roundtrip(first.state_dict())
    assert state["next_worker"] == (k % workers if workers else 0)
    resumed = loader(shards, workers, state=state)
    after = take(resumed, m - 4)
    assert_same_batches(after, reference[k : k + m - 4])
    again = loader(shards, workers, state=roundtrip(resumed.state_dict()))  # second resume
    after += take(again, 4)
    assert_same_batches(after, reference[k:])
    assert {e for e, _ in pairs(after)} == {0, 1}
    assert again.samples_seen == (k + m) * BATCH


def test_reiterating_continues_where_it_stopped(shards):
    reference = take(loader(shards), 12)
    same = loader(shards)
    assert_same_batches(take(same, 5) + take(same, 7), reference)


def test_world_size_change_covers_epoch_once(shards):
    ranks = [loader(shards, workers=0, rank=r, world=2) for r in range(2)]
    before = pairs(take(ranks[0], 7)) + pairs(take(ranks[1], 5))
    for r in ranks:  # no process group: state_dict must not try collectives
        assert r.state_dict()["start_epoch"] == 0
    state = roundtrip(merge_states([r.local_state() for r in ranks]))
    assert state["samples_seen"] == 12 * BATCH
    single = loader(shards, workers=2, state=state)
    after = pairs(take(single, N // BATCH + 6))
    epoch0 = [i for e, i in before + after if e == 0]
    assert Counter(epoch0) == Counter(range(N))  # each exactly once
    final = single.state_dict()
    assert final["start_epoch"] == 1 and 0 not in final["epochs"]


def test_state_for_other_dataset_is_rejected(shards, tmp_path):
    write_shards(tmp_path, make_samples(20), [10, 10])
    state = loader(tmp_path).state_dict()
    with pytest.raises(ValueError, match="saved for 20 samples"):
        loader(shards, state=state)


def test_views_do_not_depend_on_worker_layout(shards):
    stream = ShardStream(shards, VIEWS, BATCH, seed=7, shuffle_buffer=50)

    def epoch0_views(g: int, num_global: int) -> dict[int, torch.Tensor]:
        views = {}
        for b in stream.batches(g, num_global):
            views |= {
                int(i): b["views"][1][j] for j, i in enumerate(b["index"]) if b["epoch"][j] == 0
            }
            if b["epoch"][-1] > 0:
                return views
        raise AssertionError("unreachable: the stream is infinite")

    alone = epoch0_views(0, 1)
    split = epoch0_views(0, 3) | epoch0_views(1, 3) | epoch0_views(2, 3)
    assert sorted(alone) == sorted(split) == list(range(N))
    assert all(torch.equal(alone[i], split[i]) for i in range(N))


@pytest.fixture
def damaged(tmp_path) -> Path:
    samples = make_samples(N)
    samples[3]["jpg"] = b"this is not a jpeg"
    samples[60]["cls"] = b"not-an-int"
    del samples[100]["jpg"]
    write_shards(tmp_path, samples, SHARD_SIZES)
    shard = tmp_path / "shard-000005.tar"  # indices 200..239
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return tmp_path


def test_corrupt_members_and_truncated_shard_are_skipped(damaged, caplog):
    train = loader(damaged)
    with caplog.at_level(logging.WARNING):
        batches = take(train, 31)
    delivered = [i for e, i in pairs(batches) if e == 0]
    skipped = [i for b in batches for e, i in b["skipped"].tolist() if e == 0]
    lost = set(range(200, N)) - set(delivered)
    assert {3, 60, 100} <= set(skipped) and 0 < len(lost) < 40
    assert set(skipped) == {3, 60, 100} | lost
    assert sorted(delivered + skipped) == list(range(N))  # the rest all arrived, once
    again = {i for b in batches for e, i in b["skipped"].tolist() if e == 1}
    expected = 4 + len(again & {3, 60, 100, min(lost)})  # epoch 1 may have started on them
    assert train.corrupt_count == expected  # 3 members + 1 truncated shard (per epoch)
    assert "corrupt sample 000000003" in caplog.text and "shard-000005.tar" in caplog.text
    assert train.state_dict()["start_epoch"] == 1  # skipped samples complete the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_shards_in_order(shards, workers):
    transform = eval_transform(32, None, (0.5,) * 3, (0.5,) * 3)
    batches = list(eval_loader(shards, transform, 7, workers))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(N))
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 10 for i in range(N)]
    first = decode_image(cifar_jpegs(1)[0][0])
    assert torch.equal(batches[0]["image"][0], transform(first))
    split = [b["index"] for r in range(2) for b in eval_loader(shards, transform, 16, 0, r, 2)]
    assert sorted(torch.cat(split).tolist()) == list(range(N))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs the CIFAR-10 image folder")
def test_eval_loader_image_folder(tmp_path, caplog):
    for c in CLASSES[:3]:
        (tmp_path / c).mkdir()
        for f in sorted((CIFAR / c).glob("*.jpg"))[:10]:
            shutil.copy(f, tmp_path / c / f.name)
    (tmp_path / "automobile" / "zz_broken.jpg").write_bytes(b"garbage")
    transform = eval_transform(32, None)
    with caplog.at_level(logging.WARNING):
        batches = list(eval_loader(tmp_path, transform, 8, 0))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(20)) + list(
        range(21, 31)
    )
    assert torch.cat([b["label"] for b in batches]).tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert "zz_broken.jpg" in caplog.text


def _distributed_state(rank: int, world: int, path: str) -> dict:
    train = loader(Path(path), rank=rank, world=world)
    take(train, 3 + rank)  # ranks need not have consumed the same amount
    return train.state_dict()  # collective: all_reduce over gloo


def test_state_dict_is_collective_under_torch_distributed(shards):
    from tests.distributed import run_distributed

    states = run_distributed(_distributed_state, 2, str(shards))
    ranks = [loader(shards, rank=r, world=2) for r in range(2)]
    for r, train in enumerate(ranks):
        take(train, 3 + r)
    expected = merge_states([train.local_state() for train in ranks])
    for state in states:
        assert state["epochs"] == expected["epochs"] and state["samples_seen"] == 7 * BATCH
