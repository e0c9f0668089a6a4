"""train_subset: a fixed class-stratified subset of the training set (the data-limited regime of
the fashion-cpu study)."""

from __future__ import annotations

import json

import pytest
import torch

from msr.data import stratified_subset
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train


def test_subset_has_the_size_and_class_shares_asked_for():
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 100, 100, 100, 100, 50, 50, 50, 50, 50]))
    keep = stratified_subset(labels, 300)
    assert len(keep) == 300 and len(set(keep.tolist())) == 300
    counts = torch.bincount(labels[keep], minlength=10)
    assert counts[:5].tolist() == [40] * 5 and counts[5:].tolist() == [20] * 5  # 2:1 as in the data


def test_uneven_quotas_add_up_and_prefixes_are_mixed():
    labels = torch.arange(3).repeat_interleave(torch.tensor([7, 5, 3]))
    keep = stratified_subset(labels, 10)
    counts = torch.bincount(labels[keep], minlength=3).tolist()
    assert sum(counts) == 10 and counts == [5, 3, 2]  # 4.67, 3.33, 2.0 -> largest remainder
    big = torch.arange(10).repeat(600)  # sorted by nothing in particular, 600 a class
    prefix = big[stratified_subset(big, 5000)[:1000]]
    assert torch.bincount(prefix, minlength=10).min() > 60  # a prefix is not one class


def test_subset_is_fixed_whatever_the_global_rng():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    a = stratified_subset(labels, 500)
    torch.manual_seed(123)
    b = stratified_subset(labels, 500)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [0, 2001])
def test_subset_size_out_of_range_is_named(n):
    with pytest.raises(ValueError, match="subset of"):
        stratified_subset(torch.zeros(2000, dtype=torch.long), n)


def test_a_run_trains_on_the_subset_and_records_it(tmp_path):
    cfg = RunConfig(dataset="digits", arch="resnet8", variant="msr", epochs=1, batch_size=50, image_size=8,
                    threads=1, train_subset=200, probe_every=100)
    summary = train(cfg, tmp_path / "r", log=lambda *_: None, progress=False)
    assert summary["status"] == "completed"
    assert summary["steps"] == 4  # 200 images / batch 50: the loader saw the subset only
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train_subset"] == 200
    with pytest.raises(ConfigError, match="train_subset"):
        train(RunConfig(dataset="digits", arch="resnet8", variant="msr", epochs=1, batch_size=50, image_size=8,
                        threads=1, train_subset=300, probe_every=100), tmp_path / "r", log=lambda *_: None)


def test_a_subset_larger_than_the_training_set_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train_subset=5000: must be a number of training images from 1 to 1437"):
        train(RunConfig(dataset="digits", arch="resnet8", epochs=1, image_size=8, threads=1, train_subset=5000),
              tmp_path / "r", log=lambda *_: None)
    assert not (tmp_path / "r").exists()
