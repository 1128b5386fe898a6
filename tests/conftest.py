"""Shared fixtures: the real samples in ../shared/data, and tiny synthetic datasets converted once per session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import pathlib

import pytest
import tensorflow as tf

# Four logical CPU devices for the distribution tests (the paper trains on 4 GPUs); must precede any TF op.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 4)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared(name: str) -> pathlib.Path:
    """A folder of the real sample data; skips (with the reason) only where ../shared is absent (a user's clone)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real sample data not found at {path} (CI always has ../shared/data)")
    return path


@pytest.fixture(scope="session")
def isic_dir():
    return shared("isic2018")


@pytest.fixture(scope="session")
def chest_dir():
    return shared("chestxray14")


@pytest.fixture(scope="session")
def synth_isic_raw(tmp_path_factory):
    from stsc_tf.data import synthetic

    return synthetic.write_isic(str(tmp_path_factory.mktemp("raw") / "isic"), num_images=120, image_size=32, seed=0)


@pytest.fixture(scope="session")
def synth_isic_records(synth_isic_raw, tmp_path_factory):
    """120 synthetic ISIC-layout images at 32 px, converted (3+ train shards)."""
    from stsc_tf.config import ConvertConfig
    from stsc_tf.data.convert import convert

    out = str(tmp_path_factory.mktemp("rec") / "isic")
    convert(ConvertConfig(dataset="isic2018", source_dir=synth_isic_raw, output_dir=out, image_size=0,
                          num_shards=4, workers=1, seed=0))
    return out


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("stsc_tf").setLevel(logging.WARNING)
    yield
