"""``cifar10`` / ``cifar100``: the paper's datasets, from the official python-format archives.

Sources, in order: the extracted folder under ``<root>/raw/`` (how an offline machine, or a
test, supplies the data - nothing is fetched then), a verified archive already in ``raw/``,
then the official download (md5 checked before anything is extracted). The pickled batches are
parsed here with a restricted unpickler, their shapes and label ranges checked.
Tests write generated images in the exact official layout (tests/datagen.py), so all of this
is tested offline.
"""

from __future__ import annotations

import codecs
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msr import catalog
from msr.data import fetch
from msr.data.base import DatasetError, DatasetSpec, InputPipeline

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html). Module constants, read at call
# time, so tests can point them at a local file:// or loopback archive.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# The archives' sizes: a download that grows past them is not the archive (fetch stops there).
CIFAR10_BYTES = 170_498_071
CIFAR100_BYTES = 169_001_437

# docs/method.md: "ImageNet mean/std input normalization" for CIFAR (not CIFAR's own statistics).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

CIFAR_IMAGE_SIZE = catalog.DATASETS["cifar10"].native_size
CIFAR_CROP_PADDING = 4


@dataclass(frozen=True)
class Source:
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    archive_bytes: int
    extracted_bytes: int


def _extract_limit(name: str) -> int:
    """The most an official archive can extract to: the pixels and a label per image that the
    catalog counts, with half as much again for what the pickles add (file names, label lists)
    and the small extra files - the official CIFAR-10 folder is 186 MB, a bomb many GB
    (msr.data.fetch.extract_tar stops at this)."""
    facts = catalog.DATASETS[name]
    per_image = facts.channels * facts.native_size**2 + 1
    return (facts.train_size + facts.test_size) * per_image * 3 // 2 + (1 << 20)


def source(name: str) -> Source:
    """The constants for one CIFAR variant, read from the module globals at call time."""
    if name == "cifar10":
        return Source(
            url=CIFAR10_URL,
            md5=CIFAR10_MD5,
            archive="cifar-10-python.tar.gz",
            folder=catalog.DATASETS["cifar10"].raw_folder,
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_file="test_batch",
            label_key="labels",
            num_classes=catalog.DATASETS["cifar10"].num_classes,
            archive_bytes=CIFAR10_BYTES,
            extracted_bytes=_extract_limit("cifar10"),
        )
    if name == "cifar100":
        return Source(
            url=CIFAR100_URL,
            md5=CIFAR100_MD5,
            archive="cifar-100-python.tar.gz",
            folder=catalog.DATASETS["cifar100"].raw_folder,
            train_files=("train",),
            test_file="test",
            label_key="fine_labels",
            num_classes=catalog.DATASETS["cifar100"].num_classes,
            archive_bytes=CIFAR100_BYTES,
            extracted_bytes=_extract_limit("cifar100"),
        )
    raise ValueError(f"not a CIFAR dataset: {name!r}")


class Cifar(DatasetSpec):
    def __init__(self, name: str) -> None:
        self.name = name
        src = source(name)
        self.sources = (
            f"raw/{src.folder}/ (extracted)",
            f"raw/{src.archive} (md5 checked)",
            f"download {src.url}",
        )

    def settings(self, image_size: int | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
        if image_size not in (None, CIFAR_IMAGE_SIZE):
            raise ValueError(
                f"{self.name} images are {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE}; "
                f"got image_size={image_size!r}"
            )
        return {}

    def cache_stem(self, settings: Mapping[str, Any]) -> str:
        return self.name

    def cache_key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps({"name": self.name})

    def build(
        self,
        root: Path,
        settings: Mapping[str, Any],
        *,
        allow_download: bool,
        mirror: str | Path | None,
    ) -> dict[str, Any]:
        src = source(self.name)
        folder = root / "raw" / src.folder
        if not folder.is_dir():
            if not allow_download:
                raise DatasetError(
                    f"{self.name} not found at {folder}/ and allow_download=False: fetch {src.url} "
                    f"(md5 {src.md5}) and extract it into {folder.parent}/, or allow the download"
                )
            self.download(root)
        train = [read_batch(folder / f, src.label_key, src.num_classes) for f in src.train_files]
        test_x, test_y = read_batch(folder / src.test_file, src.label_key, src.num_classes)
        return {
            "train_x": torch.cat([x for x, _ in train]),
            "train_y": torch.cat([y for _, y in train]),
            "test_x": test_x,
            "test_y": test_y,
            "num_classes": src.num_classes,
        }

    def pipeline(self, train_x: torch.Tensor) -> InputPipeline:
        return InputPipeline(
            mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True, crop_padding=CIFAR_CROP_PADDING
        )

    def download(self, root: Path, *, mirror: str | Path | None = None) -> None:
        """Fetch, verify and extract the archive into ``<root>/raw/``.

        If the extracted folder is already there, nothing is fetched. An archive already in
        ``raw/`` is used if its md5 matches and reported (not deleted) if not: it is the user's
        file. A fresh download goes to a ``.part`` file, is md5-checked, and only then renamed
        and extracted; a failure or mismatch deletes it and names the URL and expected md5.
        """
        src = source(self.name)
        raw = Path(root) / "raw"
        if (raw / src.folder).is_dir():
            return
        archive = raw / src.archive
        # tidy=False: raw/ is shared by every dataset; only our own files are removed
        with fetch.Staging(raw, tidy=False) as stage:
            if archive.is_file():
                actual = fetch.md5_file(archive)
                if actual != src.md5:
                    raise fetch.preplaced_mismatch(
                        archive,
                        f"the official {self.name} archive",
                        f"expected md5 {src.md5}, got {actual}",
                    )
            else:
                partial = stage.temp(archive)
                try:
                    fetch.fetch(src.url, partial, max_bytes=src.archive_bytes)
                except fetch.DownloadFailed as exc:
                    raise DatasetError(
                        f"{exc}; expected md5 {src.md5}. The partial file was deleted. Without "
                        f"internet, extract the archive yourself into {raw}/ (giving "
                        f"{raw / src.folder}/)."
                    ) from exc
                actual = fetch.md5_file(partial)
                if actual != src.md5:
                    raise fetch.download_mismatch(
                        src.url, src.archive, f"expected md5 {src.md5}, got {actual}"
                    )
                stage.commit()
            fetch.extract_tar(archive, raw, src.folder, max_bytes=src.extracted_bytes)


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The CIFAR batches are pickles; resolving only the globals a numpy array needs means a
    tampered file fails with an error instead of running code. Both numpy module spellings
    are mapped (the archives were written by numpy 1 under Python 2).
    """

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = _numpy_reconstruct()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_batch(
    path: Path, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``, validated.

    Any N is accepted; the data must be ``N x 3072`` uint8 and every label in
    ``[0, num_classes)``. Every problem is a :class:`DatasetError` naming the file.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: missing CIFAR batch file")
    try:
        with path.open("rb") as f:
            entry = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(
            f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    # The real files have bytes keys (Python 2 str); tolerate re-pickled ones with str keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    for key in ("data", label_key):
        if key not in entry:
            raise DatasetError(f"{path}: missing key {key!r} (has {sorted(map(str, entry))})")
    data = entry["data"]
    expected_cols = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != expected_cols:
        raise DatasetError(f"{path}: 'data' must have shape (N, {expected_cols}), got {data.shape}")
    try:
        labels = np.asarray(entry[label_key])
    except Exception as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: {label_key!r} has {labels.shape} entries for {len(data)} images"
        )
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: {label_key!r} out of range [0, {num_classes}): "
            f"min {labels.min()}, max {labels.max()}"
        )
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(
        -1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE
    )
    return x.clone(), torch.from_numpy(labels.astype(np.int64))


CIFAR10 = Cifar("cifar10")
CIFAR100 = Cifar("cifar100")
