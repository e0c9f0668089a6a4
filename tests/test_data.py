"""msr.data: datasets (digits, CIFAR-format parsing and download, synthetic, cache) and the
device-resident loader. Everything runs offline; CIFAR is exercised with generated batches in
the official file layout and local file:// archives."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import write_cifar_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from msr import data
from msr.data import Dataset, DatasetError, DeviceLoader, cifar, fetch, normalize

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

# sha256 of train_x, train_y, test_x, test_y bytes: the split and the scaling/upsampling must be
# identical on every machine and every release. If this fails, every digits result changed.
DIGITS_SHA256 = {
    8: "fa6cacdc015a118b594590f003e2d40fb16dc78288e07216c03cb5b34ca7a70a",
    16: "61dc4312d840b3f3d31c507e97d742b448f4bc38c32c55e83faa4efc30c00510",
    32: "047e3ad208c89010d04b2932771f746ec974bbd91da876a9a75d23674dcbe915",
}


def _sha256(ds: Dataset) -> str:
    h = hashlib.sha256()
    for t in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def digits16(digits_root: Path) -> Dataset:
    return data.load_dataset("digits", digits_root)


def test_digits_split_sizes_types_and_pipeline(digits16: Dataset) -> None:
    ds = digits16
    assert (len(ds.train_x), len(ds.test_x)) == (1437, 360)
    assert ds.train_x.shape == (1437, 1, 16, 16) and ds.test_x.shape == (360, 1, 16, 16)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 16
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    assert ds.flip is False and ds.crop_padding == 2
    # normalization statistics come from the training split only
    x = ds.train_x.double() / 255
    assert ds.mean == pytest.approx((x.mean().item(),), rel=1e-9)
    assert ds.std == pytest.approx((x.std(unbiased=False).item(),), rel=1e-9)


def test_digits_split_is_stratified_and_a_partition(digits_root: Path) -> None:
    from sklearn.datasets import load_digits

    ds = data.load_dataset("digits", digits_root, image_size=8)
    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    test_counts = ds.test_y.bincount(minlength=10).numpy()
    assert np.all(np.abs(test_counts - counts * data.DIGITS_TEST_FRACTION) <= 1)
    assert np.array_equal(test_counts + ds.train_y.bincount(minlength=10).numpy(), counts)
    # at 8x8 the scaling 0..16 -> 0..255 is invertible: train + test is exactly the dataset
    both = torch.cat([ds.train_x, ds.test_x]).reshape(-1, 64).double() * 16 / 255
    labels = torch.cat([ds.train_y, ds.test_y]).numpy()
    ours = sorted(zip(labels.tolist(), both.round().long().tolist(), strict=True))
    theirs = sorted(
        zip(full.target.tolist(), full.images.reshape(-1, 64).astype(int).tolist(), strict=True)
    )
    assert ours == theirs


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_are_pinned_and_deterministic(tmp_path: Path, size: int) -> None:
    a = data.load_dataset("digits", tmp_path / "a", image_size=size)
    b = data.load_dataset("digits", tmp_path / "b", image_size=size)
    assert a.train_x.shape[-2:] == (size, size) and a.crop_padding == size // 8
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert _sha256(a) == DIGITS_SHA256[size]


def test_digits_upsampling_preserves_content(digits_root: Path, digits16: Dataset) -> None:
    small = data.load_dataset("digits", digits_root, image_size=8)
    assert torch.equal(small.train_y, digits16.train_y)
    # bilinear upsampling keeps each image's mean brightness (up to edge effects and rounding)
    m8 = small.train_x.double().mean(dim=(1, 2, 3))
    m16 = digits16.train_x.double().mean(dim=(1, 2, 3))
    assert (m8 - m16).abs().max() < 4


def test_bad_names_and_sizes_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, synthetic"):
        data.load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="valid names"):
        data.prepare("imagenet", tmp_path)
    with pytest.raises(ValueError, match="valid names"):
        data.download("svhn", tmp_path)
    with pytest.raises(ValueError, match=r"\(8, 16, 32\)"):
        data.load_dataset("digits", tmp_path, image_size=12)
    with pytest.raises(ValueError, match="32x32"):
        data.load_dataset("cifar10", tmp_path, image_size=16, allow_download=False)
    assert not (tmp_path / "processed").exists()


# --------------------------------------------------------------------------------------------
# CIFAR format, offline folder, download
# --------------------------------------------------------------------------------------------


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(data, "download", boom)
    monkeypatch.setattr(fetch, "fetch", boom)
    monkeypatch.setattr(tv_utils, "download_url", boom)
    monkeypatch.setattr(tv_utils, "_urlretrieve", boom)


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def test_write_cifar_batches_uses_the_official_layout(tmp_path: Path) -> None:
    c10 = write_cifar_batches(tmp_path, kind="cifar10", n_train=23, n_test=7)
    assert c10 == tmp_path / "cifar-10-batches-py"
    expected = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert {p.name for p in c10.iterdir()} == expected
    batch = _unpickle(c10 / "data_batch_1")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape[1] == 3072
    assert len(batch[b"labels"]) == len(batch[b"data"])
    assert len(_unpickle(c10 / "batches.meta")[b"label_names"]) == 10

    c100 = write_cifar_batches(tmp_path, kind="cifar100", n_train=9, n_test=4)
    assert c100 == tmp_path / "cifar-100-python"
    assert {p.name for p in c100.iterdir()} == {"train", "test", "meta"}
    train = _unpickle(c100 / "train")
    assert {b"data", b"fine_labels", b"coarse_labels"} <= set(train)
    with pytest.raises(ValueError):
        write_cifar_batches(tmp_path, kind="cifar1000")


def test_cifar10_parse_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_cifar_batches(tmp_path / "raw", kind="cifar10", n_train=23, n_test=7)
    _forbid_network(monkeypatch)
    ds = data.load_dataset("cifar10", tmp_path)  # download allowed, but the folder is there
    assert ds.train_x.shape == (23, 3, 32, 32) and ds.test_x.shape == (7, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.flip is True and ds.crop_padding == 4
    assert ds.mean == data.IMAGENET_MEAN and ds.std == data.IMAGENET_STD
    # rows are channel-major RGB: the parsed tensors are exactly the stored bytes, in order
    stored = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    expected_x = np.concatenate([b[b"data"] for b in stored]).reshape(-1, 3, 32, 32)
    assert np.array_equal(ds.train_x.numpy(), expected_x)
    assert ds.train_y.tolist() == sum((b[b"labels"] for b in stored), [])
    assert ds.test_y.tolist() == _unpickle(folder / "test_batch")[b"labels"]


def test_download_is_a_noop_when_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    write_cifar_batches(tmp_path / "raw", kind="cifar100", n_train=5, n_test=3)
    monkeypatch.setattr(tv_utils, "download_url", pytest.fail)
    monkeypatch.setattr(fetch, "fetch", pytest.fail)
    data.download("cifar100", tmp_path)
    data.download("digits", tmp_path)  # nothing to fetch
    data.download("synthetic", tmp_path)


def test_cifar100_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar_batches(tmp_path / "raw", kind="cifar100", n_train=130, n_test=11, seed=3)
    _forbid_network(monkeypatch)
    ds = data.load_dataset("cifar100", tmp_path, allow_download=False)
    assert ds.train_x.shape == (130, 3, 32, 32) and ds.test_x.shape == (11, 3, 32, 32)
    assert ds.num_classes == 100
    assert int(ds.train_y.min()) >= 0 and int(ds.train_y.max()) < 100
    assert len(set(ds.train_y.tolist())) == 100  # balanced generated labels use every class


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official archives were (Python 2 cPickle, protocol 2, numpy 1):
    ``str`` objects as SHORT_BINSTRING/BINSTRING and ``numpy.core.multiarray`` globals."""

    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    n, width = data.shape
    raw = data.tobytes()
    out = b"\x80\x02}(" + short(b"data")
    out += (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
    )
    out += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86"
    out += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += short(b"batch_label") + short(b"training batch 2 of 5") + b"u."
    return out


def test_python2_pickles_like_the_official_archives_parse(tmp_path: Path) -> None:
    folder = write_cifar_batches(tmp_path / "raw", kind="cifar10", n_train=10, n_test=4)
    rows = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    (folder / "data_batch_2").write_bytes(_python2_batch(rows, [9, 0, 4]))
    ds = data.load_dataset("cifar10", tmp_path, allow_download=False)
    assert ds.train_x.shape == (11, 3, 32, 32)  # batches of 2, 3 (the python 2 one), 2, 2, 2
    assert np.array_equal(ds.train_x[2:5].numpy(), rows.reshape(3, 3, 32, 32))
    assert ds.train_y[2:5].tolist() == [9, 0, 4]


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _corruptions() -> dict[str, tuple[object, str]]:
    ok = np.zeros((4, 3072), dtype=np.uint8)
    return {
        "garbage": (b"this is not a pickle", "not a readable CIFAR batch"),
        "not-a-dict": ([1, 2, 3], "expected a pickled dict"),
        "missing-labels": ({b"data": ok}, "missing key 'labels'"),
        "wrong-width": ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "3072"),
        "wrong-dtype": ({b"data": ok.astype(np.float32), b"labels": [0] * 4}, "uint8"),
        "label-count": ({b"data": ok, b"labels": [0] * 3}, "for 4 images"),
        "label-range": ({b"data": ok, b"labels": [0, 1, 2, 10]}, r"out of range \[0, 10\)"),
        "negative-label": ({b"data": ok, b"labels": [0, -1, 2, 3]}, "out of range"),
        "code-execution": ({b"data": ok, b"labels": [0] * 4, b"x": _Evil()}, "refusing"),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_cifar_batch_is_a_clear_error(tmp_path: Path, case: str) -> None:
    folder = write_cifar_batches(tmp_path / "raw", kind="cifar10", n_train=10, n_test=4)
    content, message = _corruptions()[case]
    target = folder / "data_batch_3"
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        with target.open("wb") as f:
            pickle.dump(content, f, protocol=2)
    with pytest.raises(DatasetError, match=message) as info:
        data.load_dataset("cifar10", tmp_path, allow_download=False)
    assert str(target) in str(info.value)
    assert not (tmp_path / "processed" / "cifar10.pt").exists()


def test_missing_batch_file_is_named(tmp_path: Path) -> None:
    folder = write_cifar_batches(tmp_path / "raw", kind="cifar10", n_train=10, n_test=4)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetError, match="data_batch_5"):
        data.load_dataset("cifar10", tmp_path, allow_download=False)


def test_missing_data_without_download_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        data.load_dataset("cifar100", tmp_path, allow_download=False)
    msg = str(info.value)
    assert cifar.CIFAR100_URL in msg and cifar.CIFAR100_MD5 in msg and "cifar-100-python" in msg


def _make_archive(tmp_path: Path, kind: str = "cifar10") -> tuple[Path, str]:
    """A CIFAR-format .tar.gz built like the official one; returns (file, its md5)."""
    src = tmp_path / "archive-src"
    folder = write_cifar_batches(src, kind=kind, n_train=12, n_test=5)
    name = "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
    archive = tmp_path / "server" / name
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_checksum_mismatch_deletes_download_and_names_url_and_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, _ = _make_archive(tmp_path)
    url = archive.as_uri()
    monkeypatch.setattr(cifar, "CIFAR10_URL", url)
    monkeypatch.setattr(cifar, "CIFAR10_MD5", "0123456789abcdef0123456789abcdef")
    root = tmp_path / "root"
    with pytest.raises(DatasetError) as info:
        data.load_dataset("cifar10", root)
    msg = str(info.value)
    assert url in msg and "0123456789abcdef0123456789abcdef" in msg
    raw = root / "raw"
    assert list(raw.iterdir()) == []  # no archive, no partial file, no extracted folder
    assert not (root / "processed").exists()


def test_failed_download_names_url_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = (tmp_path / "nowhere" / "cifar-100-python.tar.gz").as_uri()
    monkeypatch.setattr(cifar, "CIFAR100_URL", url)
    with pytest.raises(DatasetError) as info:
        data.download("cifar100", tmp_path / "root")
    assert url in str(info.value) and cifar.CIFAR100_MD5 in str(info.value)
    assert list((tmp_path / "root" / "raw").iterdir()) == []


def test_download_verifies_extracts_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, md5 = _make_archive(tmp_path, kind="cifar100")
    monkeypatch.setattr(cifar, "CIFAR100_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR100_MD5", md5)
    root = tmp_path / "root"
    ds = data.load_dataset("cifar100", root)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (5, 3, 32, 32)
    raw = root / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    assert hashlib.md5((raw / "cifar-100-python.tar.gz").read_bytes()).hexdigest() == md5
    # a second load is served by the cache, without touching raw/ or the network
    _forbid_network(monkeypatch)
    again = data.load_dataset("cifar100", root)
    assert torch.equal(again.train_x, ds.train_x)


def test_http_download_over_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The http(s) path (msr.data.fetch, with timeouts and retries), served from loopback."""
    import functools
    import http.server
    import threading

    archive, md5 = _make_archive(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    except OSError as exc:  # pragma: no cover - sandbox without loopback
        pytest.skip(f"cannot bind a loopback HTTP server: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        monkeypatch.setattr(cifar, "CIFAR10_URL", url)
        monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
        ds = data.load_dataset("cifar10", tmp_path / "ok")
        assert ds.train_x.shape == (12, 3, 32, 32)
        monkeypatch.setattr(cifar, "CIFAR10_MD5", "f" * 32)
        with pytest.raises(DatasetError, match="f" * 32) as info:
            data.download("cifar10", tmp_path / "bad")
        assert url in str(info.value)
        assert list((tmp_path / "bad" / "raw").iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_verified_archive_is_not_fetched_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    archive, md5 = _make_archive(tmp_path)
    raw = tmp_path / "root" / "raw"
    raw.mkdir(parents=True)
    (raw / archive.name).write_bytes(archive.read_bytes())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
    monkeypatch.setattr(tv_utils, "download_url", pytest.fail)
    monkeypatch.setattr(fetch, "fetch", pytest.fail)
    data.download("cifar10", tmp_path / "root")
    assert (raw / "cifar-10-batches-py" / "test_batch").is_file()


def test_archive_without_expected_folder_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("something-else/readme.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    monkeypatch.setattr(cifar, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        data.download("cifar10", tmp_path / "root")
    raw = tmp_path / "root" / "raw"
    assert [p.name for p in raw.iterdir()] == ["cifar-10-python.tar.gz"]  # no temp folders left


# --------------------------------------------------------------------------------------------
# synthetic and the processed cache
# --------------------------------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_learnability(tmp_path: Path) -> None:
    kw = {
        "n_train": 300,
        "n_test": 100,
        "channels": 2,
        "image_size": 12,
        "num_classes": 5,
        "seed": 7,
    }
    a = data.load_dataset("synthetic", tmp_path / "a", synthetic_kwargs=kw)
    b = data.load_dataset("synthetic", tmp_path / "b", synthetic_kwargs=kw)
    assert a.train_x.shape == (300, 2, 12, 12) and a.test_x.shape == (100, 2, 12, 12)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert a.num_classes == 5 and a.in_channels == 2 and a.image_size == 12
    assert len(a.mean) == len(a.std) == 2 and a.crop_padding == 1 and a.flip is True
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_y.bincount().tolist() == [60] * 5
    other = data.load_dataset("synthetic", tmp_path / "a", synthetic_kwargs={**kw, "seed": 8})
    assert not torch.equal(a.train_x, other.train_x)
    # learnable: a nearest-class-mean classifier fit on train generalizes to test
    x, xt = a.train_x.double().flatten(1), a.test_x.double().flatten(1)
    means = torch.stack([x[a.train_y == k].mean(0) for k in range(5)])
    accuracy = (torch.cdist(xt, means).argmin(1) == a.test_y).double().mean().item()
    assert accuracy > 0.9
    # flips preserve the label: templates are left-right symmetric
    flipped = torch.cdist(a.test_x.flip(-1).double().flatten(1), means).argmin(1) == a.test_y
    assert flipped.double().mean().item() > 0.9


def test_synthetic_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid keys"):
        data.load_dataset("synthetic", tmp_path, synthetic_kwargs={"n_samples": 3})
    with pytest.raises(ValueError, match="num_classes"):
        data.load_dataset("synthetic", tmp_path, synthetic_kwargs={"num_classes": 1})
    with pytest.raises(ValueError, match="conflicts"):
        data.load_dataset("synthetic", tmp_path, image_size=8, synthetic_kwargs={"image_size": 16})
    ds = data.load_dataset("synthetic", tmp_path, image_size=8, synthetic_kwargs={"n_train": 20})
    assert ds.train_x.shape == (20, 3, 8, 8)


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = data.prepare("digits", tmp_path, image_size=8)
    assert path == tmp_path / "processed" / "digits-8.pt"
    assert path == data.cache_path("digits", tmp_path, image_size=8)
    assert [p.name for p in path.parent.iterdir()] == ["digits-8.pt"]  # no temp files left
    payload = torch.load(path, weights_only=True)
    first = data.load_dataset("digits", tmp_path, image_size=8)
    assert torch.equal(payload["train_x"], first.train_x)

    # present cache is used: building again would fail
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt although the cache exists")

    monkeypatch.setattr(data, "_build", no_build)
    assert data.prepare("digits", tmp_path, image_size=8) == path
    cached = data.load_dataset("digits", tmp_path, image_size=8)
    for name in ("train_x", "train_y", "test_x", "test_y", "num_classes", "mean", "std"):
        assert torch.equal(
            torch.as_tensor(getattr(cached, name)), torch.as_tensor(getattr(first, name))
        )


def test_cache_and_archive_files_follow_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared data folders: written files get ordinary permissions, not mkstemp's 0600."""
    archive, md5 = _make_archive(tmp_path)
    monkeypatch.setattr(cifar, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
    old = os.umask(0o022)
    try:
        cache = data.prepare("cifar10", tmp_path / "root")
    finally:
        os.umask(old)
    assert cache.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "root" / "raw" / archive.name).stat().st_mode & 0o777 == 0o644


def test_cache_names(tmp_path: Path) -> None:
    assert data.cache_path("digits", tmp_path).name == "digits-16.pt"
    assert data.cache_path("cifar10", tmp_path).name == "cifar10.pt"
    assert data.cache_path("cifar100", tmp_path).name == "cifar100.pt"
    assert data.cache_path("synthetic", tmp_path).name == "synthetic.pt"
    custom = data.cache_path("synthetic", tmp_path, synthetic_kwargs={"seed": 1}).name
    assert (
        custom.startswith("synthetic-")
        and custom != data.cache_path("synthetic", tmp_path, synthetic_kwargs={"seed": 2}).name
    )
    path = data.prepare("synthetic", tmp_path, synthetic_kwargs={"n_train": 10, "n_test": 3})
    assert path.is_file() and path.parent == tmp_path / "processed"


def test_corrupt_or_foreign_cache_is_rebuilt(tmp_path: Path) -> None:
    path = data.prepare("digits", tmp_path, image_size=8)
    good = data.load_dataset("digits", tmp_path, image_size=8)
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        again = data.load_dataset("digits", tmp_path, image_size=8)
    assert torch.equal(again.test_x, good.test_x)
    # a cache written for other settings under this name is not trusted either
    torch.save({"format": 1, "key": "something else", "train_x": torch.zeros(1)}, path)
    with pytest.warns(UserWarning, match="stale"):
        data.prepare("digits", tmp_path, image_size=8)
    assert torch.equal(torch.load(path, weights_only=True)["test_x"], good.test_x)


# --------------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------------

MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _images(n: int, c: int = 3, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose label is their index, so a batch's labels identify its samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)


def _loader(x: torch.Tensor, y: torch.Tensor, **kw: object) -> DeviceLoader:
    args: dict = {
        "batch_size": 16,
        "mean": MEAN3[: x.shape[1]],
        "std": STD3[: x.shape[1]],
        "train": True,
    }
    args.update(kw)
    return DeviceLoader(x, y, **args)


def _epoch(loader: DeviceLoader, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_normalize_is_the_documented_formula() -> None:
    x, _ = _images(4)
    out = normalize(x, MEAN3, STD3)
    mean = torch.tensor(MEAN3).view(1, 3, 1, 1)
    std = torch.tensor(STD3).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.equal(out, (x.float() / 255 - mean) / std)


def test_batches_shapes_dtypes_and_len() -> None:
    x, y = _images(50)
    train = _loader(x, y, crop_padding=2, flip=True)
    assert train.drop_last is True and len(train) == 3
    batches = list(train)
    assert len(batches) == 3
    for xb, yb in batches:
        assert xb.shape == (16, 3, 8, 8) and xb.dtype == torch.float32
        assert yb.shape == (16,) and yb.dtype == torch.int64
    evaluation = _loader(x, y, train=False)
    assert evaluation.drop_last is False and len(evaluation) == 4
    assert [len(b) for _, b in evaluation] == [16, 16, 16, 2]
    no_drop = _loader(x, y, drop_last=False)
    assert len(no_drop) == 4 and sum(len(b) for _, b in no_drop) == 50
    small = _loader(x[:5], y[:5])  # fewer samples than a batch: one partial batch, not none
    assert small.drop_last is False and len(small) == 1 and len(next(iter(small))[1]) == 5


def test_train_epoch_is_a_permutation_and_reshuffles() -> None:
    x, y = _images(70)
    loader = _loader(x, y, drop_last=False, crop_padding=1, flip=True)
    orders = [_epoch(loader, e)[1] for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(70))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert not torch.equal(orders[0], torch.arange(70))


def test_eval_keeps_order_and_never_augments() -> None:
    x, y = _images(37)
    loader = _loader(x, y, train=False, batch_size=8, crop_padding=4, flip=True)
    for epoch in (0, 5):
        xs, ys = _epoch(loader, epoch)
        assert torch.equal(ys, y)
        assert torch.equal(xs, normalize(x, MEAN3, STD3))


def test_train_without_augmentation_yields_normalized_originals() -> None:
    x, y = _images(40)
    xs, ys = _epoch(_loader(x, y, drop_last=False), 3)
    assert torch.equal(xs, normalize(x[ys], MEAN3, STD3))


def _windows(x: torch.Tensor, p: int) -> torch.Tensor:
    """All (2p+1)^2 crops of the zero-padded image and of its mirror: (K, C, H, W)."""
    c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * p + 1) for j in range(2 * p + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_crop_and_flip_only_move_content() -> None:
    p = 2
    x, y = _images(48, size=6)
    xs, ys = _epoch(_loader(x, y, crop_padding=p, flip=True, drop_last=False), 1)
    assert xs.shape == (48, 3, 6, 6)
    centre = (2 * p + 1) ** 2 // 2
    kinds = []
    for out, label in zip(xs, ys, strict=True):
        candidates = normalize(_windows(x[label], p), MEAN3, STD3)
        match = [k for k in range(len(candidates)) if torch.equal(candidates[k], out)]
        assert match, "an augmented sample is not a shifted/mirrored window of its original"
        kinds.append(match[0])
    offsets = {k % (2 * p + 1) ** 2 for k in kinds}
    mirrored = [k >= (2 * p + 1) ** 2 for k in kinds]
    assert len(offsets - {centre}) >= 10  # many different shifts, not just the identity
    assert any(mirrored) and not all(mirrored)


def test_padding_is_raw_black() -> None:
    x = torch.full((64, 3, 4, 4), 255, dtype=torch.uint8)
    xs, _ = _epoch(_loader(x, torch.arange(64), crop_padding=2, drop_last=False), 0)
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), MEAN3, STD3)
    white = normalize(x[:1, :, :1, :1], MEAN3, STD3)
    is_black = (xs == black).all(dim=1)
    assert is_black.any() and ((xs == white).all(dim=1) | is_black).all()


def test_flip_alone_mirrors_about_half() -> None:
    x, y = _images(200, size=5)
    xs, ys = _epoch(_loader(x, y, flip=True, drop_last=False), 0)
    plain = normalize(x[ys], MEAN3, STD3)
    same = (xs == plain).flatten(1).all(1)
    mirrored = (xs == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 60 < int(mirrored.sum()) < 140


def test_epoch_is_a_pure_function_of_seed_and_epoch() -> None:
    x, y = _images(64)
    kw = {"crop_padding": 2, "flip": True}
    a, b = _loader(x, y, seed=3, **kw), _loader(x, y, seed=3, **kw)
    xa, ya = _epoch(a, 4)
    for epoch in (0, 9):  # history does not matter
        _epoch(b, epoch)
    xb, yb = _epoch(b, 4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = _epoch(a)  # iterating again without set_epoch repeats the epoch
    assert torch.equal(again[0], xa)
    other_epoch = _epoch(a, 5)
    other_seed = _epoch(_loader(x, y, seed=4, **kw), 4)
    assert not torch.equal(other_epoch[1], ya) and not torch.equal(other_seed[1], ya)
    # a different batch size cuts the same epoch differently but draws the same epoch
    c = _epoch(_loader(x, y, seed=3, batch_size=64, **kw), 4)
    assert torch.equal(c[0][:48], xa[:48])


def test_iteration_leaves_global_rng_alone() -> None:
    x, y = _images(40)
    loader = _loader(x, y, crop_padding=2, flip=True)
    before, np_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    for epoch in range(2):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)


def test_channels_last_output() -> None:
    x, y = _images(20)
    xs = next(iter(_loader(x, y, train=False, channels_last=True)))[0]
    assert xs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xs, normalize(x[:16], MEAN3, STD3))


def test_loader_rejects_bad_inputs() -> None:
    x, y = _images(10)
    with pytest.raises(ValueError, match="uint8"):
        _loader(x.float(), y)
    with pytest.raises(ValueError, match="one entry per image"):
        _loader(x, y[:5])
    with pytest.raises(ValueError, match="mean/std"):
        _loader(x, y, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="batch_size"):
        _loader(x, y, batch_size=0)
    with pytest.raises(ValueError, match="epoch"):
        _loader(x, y).set_epoch(-1)


def test_loader_feeds_a_dataset_end_to_end(digits16: Dataset) -> None:
    ds = digits16
    loader = DeviceLoader(
        ds.train_x,
        ds.train_y,
        batch_size=128,
        mean=ds.mean,
        std=ds.std,
        train=True,
        crop_padding=ds.crop_padding,
        flip=ds.flip,
    )
    xb, yb = next(iter(loader))
    assert xb.shape == (128, 1, 16, 16) and len(loader) == 1437 // 128
    # normalized with the training statistics: roughly zero mean, unit std over an epoch
    xs, _ = _epoch(loader, 0)
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_loader_matches_cpu() -> None:
    x, y = _images(64)
    kw = {"crop_padding": 2, "flip": True, "seed": 1}
    cpu = _epoch(_loader(x, y, **kw), 2)
    gpu = _epoch(_loader(x, y, device="cuda", **kw), 2)
    assert (
        gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    channels=st.integers(1, 3),
    size=st.integers(1, 7),
    pad=st.integers(0, 3),
    batch=st.integers(1, 17),
    flip=st.booleans(),
    drop_last=st.sampled_from([None, True, False]),
)
def test_loader_batches_partition_an_epoch(
    n: int, channels: int, size: int, pad: int, batch: int, flip: bool, drop_last: bool | None
) -> None:
    x, y = _images(n, c=channels, size=size)
    loader = _loader(x, y, batch_size=batch, crop_padding=pad, flip=flip, drop_last=drop_last)
    batches = list(loader)
    assert len(batches) == len(loader)
    ids = torch.cat([b for _, b in batches]) if batches else torch.empty(0, dtype=torch.int64)
    assert len(set(ids.tolist())) == len(ids)  # no sample twice in an epoch
    assert len(ids) == (n // batch * batch if loader.drop_last else n)
    for xb, yb in batches:
        assert xb.shape == (len(yb), channels, size, size) and torch.isfinite(xb).all()
