"""msr.data's fashion_mnist: IDX parsing and its errors, content checksums, the source order
(raw/ -> mirror folder -> download), the mirror override and the CLI - on small generated IDX
files, with the expected-checksum table injected for them. The download is mocked or served
from local files: nothing here touches the network. One test reads the real files of Debian's
dataset-fashion-mnist package when they are installed."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from msr import data
from msr.cli import main
from msr.data import DatasetError, fashion_mnist, fetch

FILES = fashion_mnist.FILES
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES

# measured from Debian's dataset-fashion-mnist: the decompressed official content (bytes, md5)
OFFICIAL = {
    "train-images-idx3-ubyte": (47_040_016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60_008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7_840_016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10_008, "15d484375f8d13e6eb1aabb0c3f46965"),
}
REAL_MIRROR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# IDX writers
# --------------------------------------------------------------------------------------------


def idx_bytes(magic: int, dims: list[int], body: bytes) -> bytes:
    """An IDX file: big-endian magic, one uint32 per dimension, then the raw elements."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + body


def images_idx(n: int, *, rows: int = 28, cols: int = 28, seed: int = 0) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, rows, cols), dtype=np.uint8)
    return idx_bytes(0x00000803, [n, rows, cols], pixels.tobytes()), pixels


def labels_idx(labels: list[int]) -> bytes:
    return idx_bytes(0x00000801, [len(labels)], bytes(labels))


def write_gz(path: Path, content: bytes, *, level: int = 9) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content, compresslevel=level, mtime=0))
    return path


def small_set(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, bytes]:
    """Decompressed contents of a valid small Fashion-MNIST-format set (labels cycle 0..9)."""
    train, _ = images_idx(n_train, seed=seed)
    test, _ = images_idx(n_test, seed=seed + 1)
    return {
        TRAIN_IMAGES: train,
        TRAIN_LABELS: labels_idx([i % 10 for i in range(n_train)]),
        TEST_IMAGES: test,
        TEST_LABELS: labels_idx([(3 * i) % 10 for i in range(n_test)]),
    }


def write_set(folder: Path, contents: dict[str, bytes], *, level: int = 9, only=None) -> Path:
    for name, content in contents.items():
        if only is None or name in only:
            write_gz(folder / f"{name}.gz", content, level=level)
    return folder


def table_for(contents: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {name: (len(c), hashlib.md5(c).hexdigest()) for name, c in contents.items()}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the machine's real mirror or the network unless it asks for them."""
    monkeypatch.setattr(fashion_mnist, "DEFAULT_MIRROR", str(tmp_path / "no-default-mirror"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(fashion_mnist, "official_sources", no_network)
    monkeypatch.setattr(fetch, "fetch", no_network)


@pytest.fixture
def use_table(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, bytes]], None]:
    """Inject the expected-checksum table so the given (small) contents are 'official'."""

    def inject(contents: dict[str, bytes]) -> None:
        monkeypatch.setattr(fashion_mnist, "CONTENT", table_for(contents))

    return inject


def leftovers(root: Path) -> list[str]:
    """Everything under raw/ and processed/ (relative paths), hidden files included."""
    found = []
    for sub in ("raw", "processed"):
        if (root / sub).exists():
            found += [str(p.relative_to(root)) for p in (root / sub).rglob("*")]
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Parsing a valid set
# --------------------------------------------------------------------------------------------


def test_parses_a_generated_set_exactly(tmp_path: Path, use_table) -> None:
    contents = small_set(12, 5)
    use_table(contents)
    write_set(tmp_path / "raw" / "fashion-mnist", contents)
    ds = data.load_dataset("fashion_mnist", tmp_path)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    _, train_pixels = images_idx(12, seed=0)
    assert np.array_equal(ds.train_x[:, 0].numpy(), train_pixels)  # row-major, in file order
    assert ds.train_y.tolist() == [i % 10 for i in range(12)]
    assert ds.test_y.tolist() == [(3 * i) % 10 for i in range(5)]
    assert ds.num_classes == 10 and ds.flip is True and ds.crop_padding == 2
    # normalization from the training split only, exact
    x = ds.train_x.double() / 255
    assert ds.mean == pytest.approx((x.mean().item(),), rel=1e-12)
    assert ds.std == pytest.approx((x.std(unbiased=False).item(),), rel=1e-12)
    files = ds.provenance["files"]
    assert {f: (v["bytes"], v["md5"]) for f, v in files.items()} == table_for(contents)
    assert all("already there" in v["from"] for v in files.values())
    assert data.cache_path("fashion_mnist", tmp_path) == tmp_path / "processed" / "fashion_mnist.pt"
    assert (tmp_path / "processed" / "fashion_mnist.pt").is_file()


def test_native_size_only(tmp_path: Path) -> None:
    assert data.cache_path("fashion_mnist", tmp_path, image_size=28).name == "fashion_mnist.pt"
    with pytest.raises(ValueError, match=r"28x28; got image_size=32"):
        data.load_dataset("fashion_mnist", tmp_path, image_size=32)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Every way a file can be wrong
# --------------------------------------------------------------------------------------------


def _bad_sets() -> dict[str, tuple[str, bytes, str]]:
    """case -> (file to replace, its bad decompressed content, expected error pattern)."""
    good = small_set(12, 5)
    train, _ = images_idx(12)
    return {
        "labels-magic-in-images": (
            TRAIN_IMAGES,
            idx_bytes(0x00000801, [12], bytes(12)),
            r"bad IDX magic 0x00000801 \(labels.*expected 0x00000803",
        ),
        "garbage-magic": (TEST_LABELS, b"\x1f\x8b\x08\x00" + bytes(20), "bad IDX magic 0x1f8b0800"),
        "float-images": (
            TRAIN_IMAGES,
            idx_bytes(0x00000D03, [12, 28, 28], bytes(4 * 12 * 28 * 28)),
            "bad IDX magic 0x00000d03",
        ),
        "empty-file": (TRAIN_LABELS, b"", "no header"),
        "truncated-header": (TRAIN_IMAGES, train[:10], "truncated IDX header"),
        "truncated-images": (TRAIN_IMAGES, train[:-100], r"truncated: .* 12 images of 28x28 \(9408 bytes\)"),
        "truncated-labels": (TEST_LABELS, good[TEST_LABELS][:-2], "truncated: .* 5 labels"),
        "trailing-bytes": (TEST_IMAGES, good[TEST_IMAGES] + b"\x00" * 7, "7 unexpected bytes"),
        "wrong-dims": (TRAIN_IMAGES, images_idx(12, rows=32, cols=32)[0], "32x32, expected 28x28"),
        "count-mismatch": (TRAIN_LABELS, labels_idx([1] * 11), "has 12 images but .* 11 labels"),
        "label-out-of-range": (TEST_LABELS, labels_idx([0, 1, 10, 3, 4]), r"out of range \[0, 10\).*index 2 \(value 10\)"),
        "label-255": (TRAIN_LABELS, labels_idx([255] + [0] * 11), r"out of range \[0, 10\)"),
    }


@pytest.mark.parametrize("case", list(_bad_sets()))
def test_defective_idx_file_is_a_named_error(tmp_path: Path, use_table, case: str) -> None:
    name, content, pattern = _bad_sets()[case]
    contents = {**small_set(12, 5), name: content}
    use_table(contents)  # the checksums pass: the parser must catch the defect
    folder = write_set(tmp_path / "raw" / "fashion-mnist", contents)
    with pytest.raises(DatasetError, match=pattern) as info:
        data.load_dataset("fashion_mnist", tmp_path)
    assert str(folder) in str(info.value)
    assert not (tmp_path / "processed").exists()


def test_corrupt_gzip_is_named(tmp_path: Path, use_table) -> None:
    contents = small_set()
    use_table(contents)
    folder = write_set(tmp_path / "raw" / "fashion-mnist", contents)
    gz = folder / f"{TEST_IMAGES}.gz"
    gz.write_bytes(gz.read_bytes()[:-30])  # cut off the end of the deflate stream
    with pytest.raises(DatasetError, match="not a readable gzip file") as info:
        data.load_dataset("fashion_mnist", tmp_path)
    assert str(gz) in str(info.value)


def test_mirror_checksum_mismatch_leaves_nothing(tmp_path: Path, use_table) -> None:
    contents = small_set()
    use_table(contents)
    mirror = write_set(tmp_path / "mirror", contents)
    tampered = bytearray(contents[TEST_IMAGES])
    tampered[500] ^= 0xFF  # one pixel differs: same size, other md5
    write_gz(mirror / f"{TEST_IMAGES}.gz", bytes(tampered))
    root = tmp_path / "root"
    with pytest.raises(DatasetError) as info:
        data.prepare("fashion_mnist", root, mirror=mirror)
    msg = str(info.value)
    expected_md5 = hashlib.md5(contents[TEST_IMAGES]).hexdigest()
    actual_md5 = hashlib.md5(bytes(tampered)).hexdigest()
    assert str(mirror / f"{TEST_IMAGES}.gz") in msg
    assert expected_md5 in msg and actual_md5 in msg and "nothing was copied" in msg
    # the three good files were staged too, but none is renamed into raw/ when one is bad
    assert leftovers(root) == []


def test_wrong_size_in_mirror_is_reported_with_sizes(tmp_path: Path, use_table) -> None:
    contents = small_set()
    use_table(contents)
    mirror = write_set(tmp_path / "mirror", {**contents, TRAIN_LABELS: labels_idx([1] * 13)})
    with pytest.raises(DatasetError, match=r"expected 20 bytes .* got more than 20 bytes"):
        data.prepare("fashion_mnist", tmp_path / "root", mirror=mirror)
    assert leftovers(tmp_path / "root") == []


def test_preplaced_raw_file_that_does_not_match_is_left_alone(tmp_path: Path, use_table) -> None:
    contents = small_set()
    use_table(contents)
    folder = write_set(tmp_path / "raw" / "fashion-mnist", {**contents, TRAIN_LABELS: labels_idx([0] * 12)})
    before = (folder / f"{TRAIN_LABELS}.gz").read_bytes()
    with pytest.raises(DatasetError, match="delete it or replace it") as info:
        data.load_dataset("fashion_mnist", tmp_path)
    assert f"your file {folder / TRAIN_LABELS}.gz does not match" in str(info.value)
    assert hashlib.md5(contents[TRAIN_LABELS]).hexdigest() in str(info.value)
    assert (folder / f"{TRAIN_LABELS}.gz").read_bytes() == before  # the user's file, untouched
    assert not (tmp_path / "processed").exists()


def test_real_table_rejects_small_files(tmp_path: Path) -> None:
    """Without injection the official table applies: generated files are not Fashion-MNIST."""
    write_set(tmp_path / "raw" / "fashion-mnist", small_set())
    with pytest.raises(DatasetError, match=f"expected 47040016 bytes with md5 {OFFICIAL[TRAIN_IMAGES][1]}"):
        data.load_dataset("fashion_mnist", tmp_path)
    assert fashion_mnist.CONTENT == OFFICIAL


# --------------------------------------------------------------------------------------------
# Source order, mirror override, no download
# --------------------------------------------------------------------------------------------


def _mock_download(monkeypatch: pytest.MonkeyPatch, server: Path, contents: dict[str, bytes]) -> list[str]:
    """Official sources -> a local folder of .gz files (with their real md5s); records URLs."""
    calls: list[str] = []
    md5s = {}
    for name, content in contents.items():
        gz = write_gz(server / f"{name}.gz", content, level=1)
        md5s[gz.name] = hashlib.md5(gz.read_bytes()).hexdigest()
    monkeypatch.setattr(
        fashion_mnist, "official_sources", lambda: (["https://mirror.invalid/fashion/"], md5s)
    )

    def fake_fetch(url: str, dest: Path, **kwargs: object) -> None:
        calls.append(url)
        Path(dest).write_bytes((server / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(fetch, "fetch", fake_fetch)
    return calls


def test_source_order_raw_then_mirror_then_download(
    tmp_path: Path, use_table, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = small_set()
    use_table(contents)
    root = tmp_path / "root"
    raw = write_set(root / "raw" / "fashion-mnist", contents, only={TRAIN_IMAGES, TRAIN_LABELS}, level=9)
    raw_bytes = (raw / f"{TRAIN_IMAGES}.gz").read_bytes()
    # the mirror also has train-images (compressed differently) but raw/ wins for it
    mirror = write_set(tmp_path / "mirror", contents, only={TRAIN_IMAGES, TEST_IMAGES}, level=1)
    calls = _mock_download(monkeypatch, tmp_path / "server", contents)

    ds = data.load_dataset("fashion_mnist", root, mirror=mirror)
    origin = {f: v["from"] for f, v in ds.provenance["files"].items()}
    assert "already there" in origin[TRAIN_IMAGES] and "already there" in origin[TRAIN_LABELS]
    assert origin[TEST_IMAGES] == f"mirror {mirror / TEST_IMAGES}.gz"
    assert origin[TEST_LABELS] == f"download https://mirror.invalid/fashion/{TEST_LABELS}.gz"
    assert calls == [f"https://mirror.invalid/fashion/{TEST_LABELS}.gz"]  # only what was missing
    assert (raw / f"{TRAIN_IMAGES}.gz").read_bytes() == raw_bytes
    assert (raw / f"{TEST_IMAGES}.gz").read_bytes() == (mirror / f"{TEST_IMAGES}.gz").read_bytes()
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{f}.gz" for f in FILES)

    # once all four are in raw/, neither the mirror nor the network is consulted again
    (root / "processed" / "fashion_mnist.pt").unlink()
    monkeypatch.setattr(fetch, "fetch", pytest.fail)
    for p in mirror.iterdir():
        p.unlink()
    again = data.load_dataset("fashion_mnist", root, mirror=mirror)
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_default_mirror_and_override(tmp_path: Path, use_table, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = small_set()
    use_table(contents)
    default = write_set(tmp_path / "default-mirror", contents)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_MIRROR", str(default))
    ds = data.load_dataset("fashion_mnist", tmp_path / "a")
    assert all(v["from"].startswith(f"mirror {default}/") for v in ds.provenance["files"].values())

    other = write_set(tmp_path / "other-mirror", contents, level=1)
    ds = data.load_dataset("fashion_mnist", tmp_path / "b", mirror=other)
    assert all(v["from"].startswith(f"mirror {other}/") for v in ds.provenance["files"].values())

    with pytest.raises(DatasetError, match="mirror folder .*missing-mirror does not exist"):
        data.prepare("fashion_mnist", tmp_path / "c", mirror=tmp_path / "missing-mirror")
    assert leftovers(tmp_path / "c") == []


def test_without_download_says_where_to_get_the_files(tmp_path: Path, use_table) -> None:
    use_table(small_set())
    with pytest.raises(DatasetError) as info:
        data.prepare("fashion_mnist", tmp_path, allow_download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--mirror" in msg
    assert f"{TRAIN_IMAGES}.gz" in msg
    assert leftovers(tmp_path) == []


def test_download_checks_the_official_gz_md5(
    tmp_path: Path, use_table, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = small_set()
    use_table(contents)
    calls = _mock_download(monkeypatch, tmp_path / "server", contents)
    sources = fashion_mnist.official_sources()
    md5s = dict(sources[1], **{f"{TEST_LABELS}.gz": "0" * 32})
    monkeypatch.setattr(fashion_mnist, "official_sources", lambda: (sources[0], md5s))
    with pytest.raises(DatasetError) as info:
        data.download("fashion_mnist", tmp_path / "root")
    msg = str(info.value)
    assert f"downloaded from https://mirror.invalid/fashion/{TEST_LABELS}.gz" in msg
    assert "0" * 32 in msg and "the download was deleted" in msg
    assert len(calls) == 4  # all four fetched, one rejected: none kept
    assert leftovers(tmp_path / "root") == []


# --------------------------------------------------------------------------------------------
# Registry, defaults, CLI
# --------------------------------------------------------------------------------------------


def test_registered_with_defaults_and_source_order() -> None:
    from msr.training.config import RunConfig

    assert "fashion_mnist" in data.DATASETS
    sources = data.sources("fashion_mnist")
    assert len(sources) == 3
    assert sources[0].startswith("raw/fashion-mnist") and "mirror" in sources[1] and "download" in sources[2]
    cfg = RunConfig.from_dict({"dataset": "fashion_mnist"})
    assert (cfg.batch_size, cfg.epochs) == (128, 30)


def test_cli_prepare_with_mirror_prints_counts_and_checksums(
    tmp_path: Path, use_table, capsys: pytest.CaptureFixture[str]
) -> None:
    contents = small_set(12, 5)
    use_table(contents)
    mirror = write_set(tmp_path / "mirror", contents)
    root = tmp_path / "data"
    args = ["prepare", "--dataset", "fashion_mnist", "--data-root", str(root), "--mirror", str(mirror), "--no-download"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(root / "processed" / "fashion_mnist.pt")
    assert "fashion_mnist: 12 train / 5 test images, 1x28x28, 10 classes" in err
    for name, (size, md5) in table_for(contents).items():
        assert f"{name}: {size} bytes, content md5 {md5} verified" in err
    assert main(["datasets", "--data-root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "image sizes: 28)\n    cached: fashion_mnist.pt\n" in listing
    after = listing.split("cached: fashion_mnist.pt")[1].splitlines()[1:4]
    assert [line.split()[0] for line in after] == ["1.", "2.", "3."]
    assert "raw/fashion-mnist" in after[0] and "mirror" in after[1] and "download" in after[2]


def test_cli_prepare_failure_is_one_line(tmp_path: Path, use_table, capsys: pytest.CaptureFixture[str]) -> None:
    use_table(small_set())
    code = main(["prepare", "--dataset", "fashion_mnist", "--data-root", str(tmp_path), "--no-download"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("msr prepare: error:") and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# The real files (Debian's dataset-fashion-mnist), when installed
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not all((REAL_MIRROR / f"{f}.gz").is_file() for f in FILES),
    reason=f"real Fashion-MNIST not installed at {REAL_MIRROR} "
    "(apt-get install dataset-fashion-mnist; .ci/run tries to)",
)
def test_real_fashion_mnist_from_the_debian_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist, "DEFAULT_MIRROR", str(REAL_MIRROR))
    ds = data.load_dataset("fashion_mnist", tmp_path, allow_download=False)
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.test_x.shape == (10_000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    files = ds.provenance["files"]
    assert {f: (v["bytes"], v["md5"]) for f, v in files.items()} == OFFICIAL
    # the official figures for the training split: mean 0.2860, std 0.3530
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4) and ds.std[0] == pytest.approx(0.3530, abs=1e-4)
