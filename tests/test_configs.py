"""Every config validates; the CIFAR and ImageNet-R configs run end to end on mock data."""

import glob
import json
import os

import pytest
from optional import HAS_TFDS, needs_tfds

from fastntk_jax import config as config_lib
from fastntk_jax import pipeline
from test_data import _fake_imagenet_r

if HAS_TFDS:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(name, arg=None):
  path = os.path.join(ROOT, "configs", name)
  return config_lib.load_config_file(path + (f":{arg}" if arg else ""))


def test_all_six_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert names == {"default.py", "resnet110_cifar10.py", "mobilenetv2_cifar10.py",
                   "vit_small_imagenet_r.py", "vit_base_imagenet_r.py", "vit_base_cifar10.py"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_validates_and_documents_its_command(path, arg):
  cfg = config_lib.load_config_file(path + (f":{arg}" if arg else ""))
  config_lib.validate(cfg)
  text = open(path).read()
  assert "python -m fastntk_jax.main" in text and "Expected" in text


def test_config_arguments():
  assert load("vit_small_imagenet_r.py", "classes=50,ipc=20").data.num_classes == 50
  assert load("resnet110_cifar10.py", "ipc=20").data.images_per_class == 20
  with pytest.raises(ValueError, match="bad config argument 'ipcs=3'"):
    load("resnet110_cifar10.py", "ipcs=3")


def _check(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert set(res["methods"]) == {"full", "retrain", "fastntk", "max_loss", "random_label"}
  forget = res["data"]["counts"]["forget"]
  for entry in res["methods"].values():
    correct = entry["acc_forget"]["mean"] * forget / 100.0  # k of the forget images
    assert abs(correct - round(correct)) < 1e-6 and 0 <= round(correct) <= forget
  return res


@needs_tfds
def test_resnet_cifar10_config_runs_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=60):
    pipeline.run(load("resnet110_cifar10.py", "tiny"), str(tmp_path), show_progress=False)
  assert _check(str(tmp_path))["data"]["counts"]["forget"] == 3


@needs_tfds
def test_vit_imagenet_r_config_runs_on_mock_data(tmp_path):
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r):
    pipeline.run(load("vit_small_imagenet_r.py", "tiny"), str(tmp_path), show_progress=False)
  res = _check(str(tmp_path))
  assert res["data"]["num_classes"] == 4 and res["model"]["name"] == "vit_s16"
