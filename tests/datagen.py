"""Test data written in the official layouts, so every parser runs offline exactly as on the
real files. Test-only: nothing in src/ writes data it did not download or generate for a run."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msr import catalog
from msr.data import cifar, synthetic


def write_cifar_batches(
    directory: str | Path,
    *,
    kind: str = "cifar10",
    n_train: int = 500,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write generated images in the official CIFAR python layout; return the folder written.

    ``<directory>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` for
    ``kind="cifar10"``, ``<directory>/cifar-100-python/{train, test, meta}`` for ``"cifar100"``:
    pickled dicts with bytes keys, ``data`` an ``N x 3072`` uint8 array (channel-major RGB rows)
    and ``labels`` / ``fine_labels`` (+ ``coarse_labels``) lists - what the real archives hold,
    so the parser is exercised exactly as on real data, offline. The images are the
    ``synthetic`` dataset's (32x32, RGB, learnable). Pass ``directory=<root>/raw`` to make
    ``msr.data.load_dataset`` pick them up as if downloaded.
    """
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    num_classes = catalog.dataset(kind).num_classes
    synth = synthetic.generate(
        n_train=n_train,
        n_test=n_test,
        channels=3,
        image_size=cifar.CIFAR_IMAGE_SIZE,
        num_classes=num_classes,
        seed=seed,
    )
    src = cifar.source(kind)
    folder = Path(directory) / src.folder
    folder.mkdir(parents=True, exist_ok=True)

    def batch(label: str, x: torch.Tensor, y: torch.Tensor) -> dict[bytes, Any]:
        labels = [int(v) for v in y]
        out: dict[bytes, Any] = {
            b"batch_label": label.encode(),
            b"data": x.reshape(len(x), -1).numpy(),
            b"filenames": [
                f"img_{label.replace(' ', '_')}_{i:05d}.png".encode() for i in range(len(x))
            ],
        }
        if kind == "cifar10":
            out[b"labels"] = labels
        else:
            out[b"fine_labels"] = labels
            out[b"coarse_labels"] = [v // 5 for v in labels]
        return out

    train_x, train_y = synth["train_x"], synth["train_y"]
    if kind == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(parts, start=1):
            sel = torch.from_numpy(idx)
            _pickle_dump(
                batch(f"training batch {i} of 5", train_x[sel], train_y[sel]),
                folder / f"data_batch_{i}",
            )
        _pickle_dump(
            batch("testing batch 1 of 1", synth["test_x"], synth["test_y"]), folder / "test_batch"
        )
        meta = {
            b"label_names": [f"class{k}".encode() for k in range(num_classes)],
            b"num_cases_per_batch": max(len(p) for p in parts),
            b"num_vis": 3 * cifar.CIFAR_IMAGE_SIZE**2,
        }
        _pickle_dump(meta, folder / "batches.meta")
    else:
        _pickle_dump(batch("training batch 1 of 1", train_x, train_y), folder / "train")
        _pickle_dump(
            batch("testing batch 1 of 1", synth["test_x"], synth["test_y"]), folder / "test"
        )
        meta = {
            b"fine_label_names": [f"fine{k}".encode() for k in range(num_classes)],
            b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)],
        }
        _pickle_dump(meta, folder / "meta")
    return folder


def _pickle_dump(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)
