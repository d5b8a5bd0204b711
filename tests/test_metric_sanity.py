"""The quality metric must move on the defects a person sees, and stay put for another real sample.

These run on real MNIST, which the tests never download: they use the data root named by the environment
variable ``MNIST_DATA_ROOT`` (or ``./data``, the scripts' default) and are skipped when it holds no MNIST.
They score with the bundled classifier, the one ``evaluate.py`` uses; the table of docs/quality.md
(``tools/metric_sanity.py``) gives the same cases at a larger sample size.
"""

from __future__ import annotations

import os

import pytest

from lib import classifier
from tools.metric_sanity import defects, two_real_samples
from conftest import all_cores
from lib.data import load_dataset
from lib.metrics import Reference

ROOT = os.environ.get("MNIST_DATA_ROOT", "data")
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ROOT, "MNIST", "raw", "t10k-images-idx3-ubyte")),
    reason="real MNIST not found: set MNIST_DATA_ROOT to a data root holding MNIST/raw")


@pytest.fixture(scope="module")
def real():
    with all_cores():
        train = load_dataset(ROOT, train=True, download=False)
        test = load_dataset(ROOT, train=False, download=False)
        if not os.path.isfile(classifier.BUNDLED):
            pytest.skip("no bundled classifier in this copy of the project")
        model, _ = classifier.read_classifier(classifier.BUNDLED)
        first, second = two_real_samples(train[1], per_class=100)
        ref = Reference(model, train, test)
    return {"ref": ref, "first": (train[0][first], train[1][first]), "second": (train[0][second], train[1][second])}


def test_a_second_real_sample_stays_at_the_floor(real):
    floor, again = real["ref"].score(*real["first"]), real["ref"].score(*real["second"])
    assert again["fid"] < 1.5 * floor["fid"]
    assert abs(again["precision"] - floor["precision"]) < 0.05 and abs(again["recall"] - floor["recall"]) < 0.05


def test_every_defect_raises_the_fid_clearly_above_the_floor(real):
    floor = real["ref"].score(*real["first"])["fid"]
    with all_cores():
        fids = {name: real["ref"].score(images, labels)["fid"] for name, (images, labels) in
                defects(*real["first"]).items()}
    for name, fid in fids.items():
        assert fid > 3 * floor, name
