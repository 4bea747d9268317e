"""ViT weights by their published names: the configs name the exact AugReg files, an
ImageNet-21k checkpoint's `pre_logits` is dropped with a message, `dont_load` is settable
from the config and the command line, and the ViT configs solve in float64."""

import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from fastntk_jax import config as config_lib
from fastntk_jax.experiment import pretrain
from fastntk_jax.models import checkpoints as ck
from test_checkpoints import _VIT, _fresh, _npz_layout, _write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name):
  return config_lib.load_config_file(os.path.join(ROOT, "configs", name))


def test_configs_name_the_published_augreg_files():
  published = {  # google-research/vision_transformer's gs://vit_models/augreg/ (timm's URLs)
      "vit_small_imagenet_r.py": "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"
                                 "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
      "vit_base_imagenet_r.py": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1"
                                "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
      "vit_base_cifar10.py": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1"
                             "--imagenet2012-steps_20k-lr_0.01-res_224.npz",
  }
  readme = open(os.path.join(ROOT, "README.md")).read()
  for name, file in published.items():
    c = _cfg(name)
    assert c.pretrain.path == f"checkpoints/{file}"
    assert c.unlearn.solve_dtype == "float64" and c.pretrain.source == "npz"
    assert file in readme, f"README does not tell users to download {file}"
  i21k = _cfg("vit_base_imagenet_r.py:weights=i21k")
  assert i21k.pretrain.path.endswith("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
  from configs import common  # pylint: disable=g-import-not-at-top
  for (model, weights), file in common.VIT_CHECKPOINTS.items():
    assert file.startswith({"vit_s16": "S_16-", "vit_b16": "B_16-"}[model])
    assert ("i1k-300ep" in file) == (weights == "i1k")
    assert file in readme
  with pytest.raises(ValueError, match="weights must be one of"):
    _cfg("vit_base_imagenet_r.py:weights=jft")


def test_pre_logits_of_an_imagenet21k_checkpoint_is_dropped_with_a_message(tmp_path, caplog):
  shapes = _npz_layout(classes=21843)
  shapes["pre_logits/kernel"] = (16, 16)
  shapes["pre_logits/bias"] = (16,)
  arrays = _write_npz(tmp_path / "ViT-B_16.npz", shapes)
  _, fresh = _fresh()
  report = {}
  with caplog.at_level(logging.INFO, logger="fastntk_jax.models.checkpoints"):
    out = ck.load_vit_npz(str(tmp_path / "ViT-B_16.npz"), fresh, report=report)
  assert report["dropped"] == ["pre_logits/bias", "pre_logits/kernel"]
  assert "dropping pre_logits/bias, pre_logits/kernel" in caplog.text
  np.testing.assert_array_equal(out["params"]["Transformer"]["encoder_norm"]["scale"],
                                arrays["Transformer/encoder_norm/scale"])
  assert "head/kernel" in report["kept_at_init"]


def test_dont_load_from_the_config_reaches_the_loader(tmp_path):
  shapes = _npz_layout()
  del shapes["Transformer/encoder_norm/scale"], shapes["Transformer/encoder_norm/bias"]
  _write_npz(tmp_path / "w.npz", shapes)
  cfg = _cfg("vit_small_imagenet_r.py:tiny")
  cfg.pretrain.source, cfg.pretrain.path = "npz", str(tmp_path / "w.npz")
  cfg.pretrain.dont_load = ("head/.*", "Transformer/encoder_norm/.*")
  cfg.model.options = {**_VIT, "prompt_length": 2}
  config_lib.validate(cfg)
  assert tuple(cfg.pretrain.dont_load) == ("head/.*", "Transformer/encoder_norm/.*")
  model, fresh = _fresh(prompt_length=2)
  data = types.SimpleNamespace(image_shape=(8, 8, 3))
  variables = pretrain.pretrain_stage(cfg, model, data, str(tmp_path / "wd"), _NoProgress())
  norm = variables["params"]["Transformer"]["encoder_norm"]["scale"]
  assert norm.shape == (16,)
  info = pretrain.pretrain_info(str(tmp_path / "wd"))
  assert "Transformer/encoder_norm/scale" in info["kept_at_init"] and info["dropped"] == []
  # Without the pattern the same file is refused, naming what is missing.
  cfg.pretrain.dont_load = ("head/.*",)
  with pytest.raises(ck.CheckpointError, match="Transformer/encoder_norm/bias"):
    pretrain.pretrain_stage(cfg, model, data, str(tmp_path / "wd2"), _NoProgress())
  cfg.pretrain.dont_load = ("head/[",)
  with pytest.raises(ValueError, match="not a regular expression"):
    config_lib.validate(cfg)


class _NoProgress:
  def epochs(self, tag, total):
    return None


def test_dont_load_on_the_command_line():
  proc = subprocess.run(
      [sys.executable, "-m", "fastntk_jax.main", "--dry_run",
       "--config=configs/vit_base_imagenet_r.py:classes=20,ipc=50",
       "--config.pretrain.dont_load=('head/.*','pre_logits/.*')"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  cfg = json.loads(proc.stdout)
  assert cfg["pretrain"]["dont_load"] == ["head/.*", "pre_logits/.*"]
  assert cfg["unlearn"]["solve_dtype"] == "float64"
