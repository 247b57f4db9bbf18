"""Tests of ``python -m data_prep write`` / ``verify`` on a real CIFAR-10 subset and synthetic images."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_prep.manifest import Manifest
from data_prep.reader import RawSample, ShardReadError, decode_image, iter_tar_samples
from data_prep.verify import verify_shards
from data_prep.writer import (
    WriteOptions,
    closed_tar_size,
    member_tarinfo,
    tar_bytes,
    write_shards,
)
from tests.paths import CIFAR10

REPO_ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 20

needs_cifar = pytest.mark.skipif(
    not (CIFAR10 / "train").is_dir(), reason=f"CIFAR-10 images not found at {CIFAR10}/train"
)


# ---------------------------------------------------------------- helpers and fixtures


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """Run ``python -m data_prep ARGS`` from the repo root, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write(src: Path, out: Path, **options) -> Manifest:
    """Write shards in-process and return the manifest as loaded back from disk."""
    write_shards(src, out, WriteOptions(**options))
    return Manifest.load(out)


def read_all(out: Path) -> list[list[RawSample]]:
    """Every sample of every shard listed in ``out``'s manifest, per shard."""
    return [list(iter_tar_samples(out / s.name)) for s in Manifest.load(out).shards]


def flat(out: Path) -> list[RawSample]:
    return [sample for shard in read_all(out) for sample in shard]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def save_image(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.paste((10, 240, 10), (0, 0, size[0] // 2, size[1] // 3))
    img.save(path)


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder tree of 20 real CIFAR-10 train images per class (copies, safe to damage)."""
    if not (CIFAR10 / "train").is_dir():
        pytest.skip(f"CIFAR-10 images not found at {CIFAR10}/train")
    root = tmp_path_factory.mktemp("cifar_subset")
    for class_dir in sorted(p for p in (CIFAR10 / "train").iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir()
        for image in sorted(class_dir.glob("*.jpg"))[:PER_CLASS]:
            shutil.copyfile(image, root / class_dir.name / image.name)
    return root


@pytest.fixture(scope="module")
def cifar_shards(cifar_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The subset written with 50 samples per shard (4 shards), one worker."""
    out = tmp_path_factory.mktemp("cifar_shards")
    write(cifar_src, out, shard_size=50, workers=1, overwrite=True)
    return out


@pytest.fixture
def good_copy(cifar_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the written shard set, for tests that damage it."""
    return Path(shutil.copytree(cifar_shards, tmp_path / "shards"))


# ---------------------------------------------------------------- round trip on real data


@needs_cifar
def test_round_trip_real_cifar_subset(cifar_src: Path, cifar_shards: Path) -> None:
    manifest = Manifest.load(cifar_shards)
    classes = sorted(p.name for p in cifar_src.iterdir())
    assert manifest.classes == classes
    assert manifest.source_kind == "image_folder"
    assert manifest.source == str(cifar_src.resolve())
    assert manifest.skipped == []
    assert manifest.options == {
        "seed": 0,
        "shard_size": 50,
        "shard_bytes": 1_000_000_000,
        "resize_max": None,
        "max_samples": None,
    }
    assert [s.num_samples for s in manifest.shards] == [50, 50, 50, 50]
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(4)]

    shards = read_all(cifar_shards)
    for info, samples in zip(manifest.shards, shards, strict=True):
        data = (cifar_shards / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256
        assert len(data) == info.bytes
        assert len(samples) == info.num_samples
        shard_classes = {s.label() for s in samples}
        assert len(shard_classes) > 1, f"{info.name} holds a single class"

    samples = [s for shard in shards for s in shard]
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(10 * PER_CLASS)]
    seen_paths = set()
    for sample in samples:
        meta = sample.meta()
        class_name = meta["path"].split("/")[0]
        assert sample.label() == classes.index(class_name) == meta["label"]
        assert meta["class"] == class_name
        ext, data = sample.image_bytes()
        assert ext == "jpg"
        assert data == (cifar_src / meta["path"]).read_bytes()
        assert decode_image(data).size == (32, 32)
        seen_paths.add(meta["path"])
    assert len(seen_paths) == 10 * PER_CLASS
    assert Counter(p.split("/")[0] for p in seen_paths) == dict.fromkeys(classes, PER_CLASS)


@needs_cifar
def test_tar_members_have_fixed_metadata(cifar_shards: Path) -> None:
    with tarfile.open(cifar_shards / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.cls", "000000000.json"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) == (0, 0, 0, 0o644, "", "")


@needs_cifar
def test_webdataset_reads_the_shards(cifar_shards: Path) -> None:
    wds = pytest.importorskip("webdataset")
    urls = [str(cifar_shards / s.name) for s in Manifest.load(cifar_shards).shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == 10 * PER_CLASS
    assert samples[0][0].size == (32, 32)
    assert all(0 <= label < 10 for _, label in samples)


# ---------------------------------------------------------------- determinism and options


@needs_cifar
def test_workers_give_byte_identical_shards(cifar_src: Path, tmp_path: Path) -> None:
    write(cifar_src, tmp_path / "w1", shard_size=30, workers=1)
    result = run_cli("write", cifar_src, tmp_path / "w2", "--shard-size", "30", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 200 samples in 7 shards" in result.stdout
    one, two = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert len(one) == 7
    assert one == two
    assert Manifest.load(tmp_path / "w1").to_dict() == Manifest.load(tmp_path / "w2").to_dict()


@needs_cifar
def test_seed_changes_order_not_content(
    cifar_src: Path, cifar_shards: Path, tmp_path: Path
) -> None:
    write(cifar_src, tmp_path / "s1", shard_size=50, seed=1)
    order0 = [s.meta()["path"] for s in flat(cifar_shards)]
    order1 = [s.meta()["path"] for s in flat(tmp_path / "s1")]
    assert order0 != order1
    assert sorted(order0) == sorted(order1)


@needs_cifar
def test_max_samples_keeps_first_n_after_shuffle(
    cifar_src: Path, cifar_shards: Path, tmp_path: Path
) -> None:
    manifest = write(cifar_src, tmp_path / "m", max_samples=37, shard_size=10)
    assert manifest.num_samples == 37
    assert [s.num_samples for s in manifest.shards] == [10, 10, 10, 7]
    full_order = [s.meta()["path"] for s in flat(cifar_shards)]
    assert [s.meta()["path"] for s in flat(tmp_path / "m")] == full_order[:37]


@needs_cifar
def test_shard_size_bound(cifar_src: Path, tmp_path: Path) -> None:
    manifest = write(cifar_src, tmp_path / "n", shard_size=7)
    counts = [s.num_samples for s in manifest.shards]
    assert counts == [7] * 28 + [4]
    assert [len(s) for s in read_all(tmp_path / "n")] == counts


@needs_cifar
def test_shard_bytes_bound(cifar_src: Path, tmp_path: Path) -> None:
    limit = 40_000
    manifest = write(cifar_src, tmp_path / "b", shard_bytes=limit)
    assert manifest.num_samples == 10 * PER_CLASS
    assert manifest.num_shards > 2
    for info in manifest.shards:
        assert (tmp_path / "b" / info.name).stat().st_size == info.bytes <= limit
    # Every shard but the last is full: the next sample would have pushed it past the limit.
    shards = read_all(tmp_path / "b")
    for info, shard, next_shard in zip(manifest.shards, shards, shards[1:], strict=False):
        offset = sum(tar_bytes(list(s.files.items())) for s in shard)
        assert closed_tar_size(offset) == info.bytes
        assert closed_tar_size(offset + tar_bytes(list(next_shard[0].files.items()))) > limit


@needs_cifar
def test_tiny_shard_bytes_still_holds_one_sample(cifar_src: Path, tmp_path: Path) -> None:
    manifest = write(cifar_src, tmp_path / "t", shard_bytes=1000, max_samples=5)
    assert [s.num_samples for s in manifest.shards] == [1] * 5


def test_member_header_matches_closed_size_accounting(tmp_path: Path) -> None:
    """closed_tar_size predicts tarfile's real file size (end blocks + record padding)."""
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(member_tarinfo("a.bin", 700), io.BytesIO(b"x" * 700))
        offset = tar.offset
    assert path.stat().st_size == closed_tar_size(offset) == 10240


def test_resize_max_reencodes_only_large_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(src / "big.png", (200, 100))
    save_image(src / "big.jpg", (200, 100))
    save_image(src / "tall.jpeg", (50, 300))
    save_image(src / "small.jpg", (60, 30))
    write(src, tmp_path / "out", resize_max=64)
    by_path = {s.meta()["path"]: s for s in flat(tmp_path / "out")}
    assert set(by_path) == {"big.png", "big.jpg", "tall.jpeg", "small.jpg"}
    expected = {"big.png": ("png", (64, 32)), "big.jpg": ("jpg", (64, 32))}
    expected |= {"tall.jpeg": ("jpg", (11, 64)), "small.jpg": ("jpg", (60, 30))}
    for path, (ext, size) in expected.items():
        got_ext, data = by_path[path].image_bytes()
        assert got_ext == ext
        assert decode_image(data).size == size
    assert Image.open(io.BytesIO(by_path["big.png"].image_bytes()[1])).format == "PNG"
    assert Image.open(io.BytesIO(by_path["big.jpg"].image_bytes()[1])).format == "JPEG"
    assert by_path["small.jpg"].image_bytes()[1] == (src / "small.jpg").read_bytes()
    assert by_path["big.jpg"].image_bytes()[1] != (src / "big.jpg").read_bytes()


# ---------------------------------------------------------------- other source kinds


def test_unlabelled_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(src / "top.png", (8, 8))
    save_image(src / "a" / "b" / "deep.JPG", (8, 8))
    save_image(src / "c" / "mid.webp", (8, 8))
    (src / "notes.txt").write_text("not an image")
    save_image(src / ".hidden" / "x.png", (8, 8))
    manifest = write(src, tmp_path / "out")
    assert manifest.source_kind == "unlabelled_folder"
    assert manifest.classes is None
    samples = flat(tmp_path / "out")
    assert sorted(s.meta()["path"] for s in samples) == ["a/b/deep.JPG", "c/mid.webp", "top.png"]
    for sample in samples:
        assert "cls" not in sample.files
        assert sample.label() is None and sample.meta()["label"] is None
    assert sorted(s.image_bytes()[0] for s in samples) == ["jpg", "png", "webp"]
    assert verify_shards(tmp_path / "out").ok


def test_nested_folders_without_direct_images_are_unlabelled(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_image(src / "2023" / "01" / "a.png", (8, 8))
    save_image(src / "2024" / "02" / "b.png", (8, 8))
    assert write(src, tmp_path / "out").source_kind == "unlabelled_folder"


@needs_cifar
def test_file_list_with_int_labels(cifar_src: Path, tmp_path: Path) -> None:
    images = sorted(cifar_src.glob("*/*.jpg"))[:6]
    rows = ["path,label"]
    rows += [f"{p},{i % 3}" for i, p in enumerate(images[:3])]  # absolute paths
    local = tmp_path / "imgs"
    local.mkdir()
    for i, p in enumerate(images[3:], start=3):
        shutil.copyfile(p, local / p.name)
        rows.append(f"imgs/{p.name},{i % 3}")  # relative to the CSV
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n\n")
    manifest = write(tmp_path / "list.csv", tmp_path / "out")
    assert manifest.source_kind == "file_list"
    assert manifest.classes is None
    assert manifest.num_samples == 6
    expected = {row.split(",")[0]: int(row.split(",")[1]) for row in rows[1:]}
    for sample in flat(tmp_path / "out"):
        meta = sample.meta()
        assert sample.label() == meta["label"] == expected[meta["path"]]
        assert meta["class"] is None
    assert verify_shards(tmp_path / "out").ok


@needs_cifar
def test_file_list_with_class_names(cifar_src: Path, tmp_path: Path) -> None:
    images = sorted(cifar_src.glob("*/*.jpg"))[::10]
    rows = [f"{p},{p.parent.name.upper()}" for p in images]
    (tmp_path / "names.csv").write_text("\n".join(rows))
    manifest = write(tmp_path / "names.csv", tmp_path / "out")
    names = sorted({p.parent.name.upper() for p in images})
    assert len(names) == 10
    assert manifest.classes == names
    assert manifest.num_samples == len(images)
    for sample in flat(tmp_path / "out"):
        meta = sample.meta()
        assert meta["class"] == Path(meta["path"]).parent.name.upper()
        assert sample.label() == names.index(meta["class"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.jpg,1\nb.jpg,2,3\n", "names.csv:2"),
        ("a.jpg,1\nb.jpg\n", "names.csv:2"),
        ("a.jpg,cat\nb.jpg,3\n", "names.csv:2"),
        ("a.txt,1\n", "not an image"),
    ],
)
def test_bad_csv_rows_exit_2(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "names.csv").write_text(content)
    result = run_cli("write", tmp_path / "names.csv", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- bad sources


@needs_cifar
def test_corrupt_source_image_is_skipped(cifar_src: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(cifar_src, tmp_path / "src"))
    (src / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 20)
    truncated = src / "dog" / "truncated.jpg"
    truncated.write_bytes(next((src / "dog").glob("0*.jpg")).read_bytes()[:300])
    result = run_cli("write", src, tmp_path / "out", "--shard-size", "64")
    assert result.returncode == 0, result.stderr
    assert "skipped 2" in result.stdout
    assert "garbage.jpg" in result.stderr and "truncated.jpg" in result.stderr
    manifest = Manifest.load(tmp_path / "out")
    assert sorted(s["path"] for s in manifest.skipped) == ["cat/garbage.jpg", "dog/truncated.jpg"]
    assert all(s["error"] for s in manifest.skipped)
    assert manifest.num_samples == 10 * PER_CLASS
    keys = [s.key for s in flat(tmp_path / "out")]
    assert keys == [f"{i:09d}" for i in range(10 * PER_CLASS)]
    assert run_cli("verify", tmp_path / "out").returncode == 0


def test_missing_src_exit_2_one_line(tmp_path: Path) -> None:
    result = run_cli("write", tmp_path / "nope", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: source {tmp_path / 'nope'} does not exist"
    ]
    assert not (tmp_path / "out").exists()


def test_src_without_images_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    result = run_cli("write", tmp_path / "empty", tmp_path / "out")
    assert result.returncode == 2
    assert "holds no images" in result.stderr


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(6):
        save_image(src / f"{i}.png", (8, 8), (i * 40, 0, 0))
    out = tmp_path / "out"
    assert run_cli("write", src, out, "--shard-size", "1").returncode == 0
    assert len(list(out.glob("shard-*.tar"))) == 6
    refused = run_cli("write", src, out)
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr
    assert len(list(out.glob("shard-*.tar"))) == 6
    replaced = run_cli("write", src, out, "--shard-size", "4", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_help_explains_options() -> None:
    result = run_cli("write", "--help")
    assert result.returncode == 0
    for option in ("--seed", "--shard-size", "--shard-bytes", "--max-samples", "--resize-max"):
        assert option in result.stdout
    for option in ("--workers", "--overwrite"):
        assert option in result.stdout
    assert "--workers" in run_cli("verify", "--help").stdout


# ---------------------------------------------------------------- verify


@needs_cifar
def test_verify_good_set(cifar_shards: Path) -> None:
    result = run_cli("verify", cifar_shards, "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 4 shards, 200/200 samples OK" in result.stdout


def image_member_offset(shard: Path, index: int) -> tuple[str, int, int]:
    """(key, data offset, size) of the image member of the ``index``-th sample of ``shard``."""
    with tarfile.open(shard) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    member = images[index]
    return member.name.split(".")[0], member.offset_data, member.size


@needs_cifar
def test_verify_flipped_bytes(good_copy: Path) -> None:
    shard = good_copy / "shard-000002.tar"
    key, offset, size = image_member_offset(shard, 5)
    data = bytearray(shard.read_bytes())
    data[offset : offset + 4] = bytes(b ^ 0xFF for b in data[offset : offset + 4])  # kill SOI
    shard.write_bytes(bytes(data))
    result = run_cli("verify", good_copy)
    assert result.returncode == 1
    assert "BAD shard-000002.tar: sha256 mismatch" in result.stdout
    assert f"BAD shard-000002.tar {key}: image does not decode" in result.stdout
    assert "bad shards: shard-000002.tar" in result.stdout


@needs_cifar
def test_verify_truncated_shard(good_copy: Path) -> None:
    shard = good_copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    result = run_cli("verify", good_copy)
    assert result.returncode == 1
    assert "BAD shard-000001.tar: truncated/unreadable tar" in result.stdout
    assert "BAD shard-000001.tar: count mismatch" in result.stdout
    assert "bad shards: shard-000001.tar" in result.stdout


@needs_cifar
def test_verify_count_mismatch_and_missing_shard(good_copy: Path) -> None:
    manifest = json.loads((good_copy / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 49
    (good_copy / "manifest.json").write_text(json.dumps(manifest))
    (good_copy / "shard-000003.tar").unlink()
    report = verify_shards(good_copy)
    assert not report.ok
    assert report.bad_shards[0] == "shard-000000.tar"
    reasons = [str(p) for p in report.problems]
    assert "shard-000000.tar: count mismatch: 50 samples read, manifest says 49" in reasons
    assert "shard-000003.tar: missing" in reasons
    # Later shards' keys no longer match the global index implied by the edited counts.
    assert any(
        p.shard == "shard-000001.tar" and "key out of order" in p.reason for p in report.problems
    )


@needs_cifar
def test_verify_label_out_of_range(good_copy: Path) -> None:
    manifest = json.loads((good_copy / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:3]
    (good_copy / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shards(good_copy, workers=2)
    assert not report.ok
    assert any("out of range" in p.reason and p.key for p in report.problems)


def test_verify_without_manifest_exit_2(tmp_path: Path) -> None:
    result = run_cli("verify", tmp_path)
    assert result.returncode == 2
    assert "manifest.json not found" in result.stderr


@needs_cifar
@pytest.mark.parametrize("cut", ["header_boundary", "inside_header", "inside_data", "end_blocks"])
def test_reader_raises_on_any_truncation(cifar_shards: Path, tmp_path: Path, cut: str) -> None:
    """A shard cut anywhere, including exactly between members, raises ShardReadError."""
    data = (cifar_shards / "shard-000000.tar").read_bytes()
    with tarfile.open(cifar_shards / "shard-000000.tar") as tar:
        members = tar.getmembers()
    member, last = members[40], members[-1]
    cut_at = {
        "header_boundary": member.offset,
        "inside_header": member.offset + 100,
        "inside_data": member.offset_data + 10,
        "end_blocks": last.offset_data + -(-last.size // 512) * 512,
    }[cut]
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:cut_at])
    with pytest.raises(ShardReadError):
        list(iter_tar_samples(shard))
