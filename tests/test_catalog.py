"""msr.catalog is the one home of the dataset and variant facts: what the library builds, the
config schema and the command line must all agree with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datagen import write_cifar_batches

from msr import catalog, data
from msr.core.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_built_datasets_have_the_catalogs_facts(name, tmp_path):
    facts = catalog.dataset(name)
    ds = data.load_dataset(name, tmp_path)
    assert (len(ds.train_y), len(ds.test_y)) == (facts.train_size, facts.test_size)
    assert ds.num_classes == facts.num_classes and ds.in_channels == facts.channels
    assert ds.image_size == facts.image_size  # the size trained at when none is given
    if facts.image_sizes is not None:
        for size in facts.image_sizes:
            assert data.load_dataset(name, tmp_path, image_size=size).image_size == size


def test_cifar_and_fashion_facts_are_the_parsers(tmp_path):
    """CIFAR's and Fashion-MNIST's full sets cannot be loaded here: the parsers read their
    classes, channels, image size and archive folder from the catalog, and data in the official
    layout loads with exactly those."""
    from msr.data import fashion_mnist

    for name in ("cifar10", "cifar100"):
        facts = catalog.dataset(name)
        folder = write_cifar_batches(tmp_path / "raw", kind=name, n_train=facts.num_classes, n_test=4)
        assert folder.name == facts.raw_folder
        ds = data.load_dataset(name, tmp_path, allow_download=False)
        assert ds.num_classes == facts.num_classes and ds.in_channels == facts.channels
        assert ds.image_size == facts.image_size == facts.native_size
    fm = catalog.dataset("fashion_mnist")
    assert (fashion_mnist.IMAGE_SIZE, fashion_mnist.NUM_CLASSES) == (fm.native_size, fm.num_classes)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid names: digits, cifar10"):
        catalog.dataset("mnist")
    with pytest.raises(ValueError, match="unknown variant 'bnn'; valid variants: bn, bn_noise"):
        catalog.check_variant("bnn")


def test_the_registry_is_the_catalogs_variants_in_order():
    assert tuple(VARIANTS) == catalog.VARIANTS
    assert {name: spec.claim for name, spec in VARIANTS.items()} == catalog.VARIANT_CLAIMS


def test_schema_enums_are_the_catalog():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$defs"]["variant"]["enum"] == list(catalog.VARIANTS)
    assert schema["$defs"]["dataset"]["enum"] == list(catalog.DATASETS)


def test_the_bench_methods_the_cli_offers_are_the_benchs():
    from msr.cli import tools
    from msr.infra import bench

    assert tools.BENCH_METHODS == bench.METHODS


def test_the_command_line_builds_without_torch():
    """`msr verify`, `msr reset-run` (before every train job) and `--help` stay fast: building
    the whole parser imports no torch."""
    code = "import sys; import msr.cli; msr.cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
