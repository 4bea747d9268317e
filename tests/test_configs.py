"""Every config validates and documents its command; the CIFAR and ImageNet-R configs run end
to end on mock data (the end-to-end tier)."""

import glob
import json
import os

import numpy as np
import pytest
from optional import HAS_TFDS, needs_tfds

from fastntk_jax import config as config_lib
from fastntk_jax.experiment import run as run_lib
from test_checkpoints import _npz_layout, _write_npz

if HAS_TFDS:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import fake_tfds  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) != "common.py")


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
  assert set(res["methods"]) == set(res["config"]["methods"])
  forget = res["data"]["counts"]["forget"]
  for entry in res["methods"].values():
    correct = entry["acc_forget"]["mean"] * forget / 100.0  # k of the forget images
    assert abs(correct - round(correct)) < 1e-6 and 0 <= round(correct) <= forget
  return res


# Every CIFAR class (CIFAR-100's too, for the CNNs' pre-training) with 4 training and 2 test
# images: plain mock data draws labels at random and leaves some of CIFAR-100's out.
CIFAR_FAKE = fake_tfds.balanced({"train": 4, "test": 2}) if HAS_TFDS else None
_fake_imagenet_r = fake_tfds.imagenet_r(4) if HAS_TFDS else None  # #IPC 2 + hold-out 2


# Which test runs each config end to end at its tiny size (configs/default.py: the session
# fixture of tests/conftest.py).
END_TO_END = {"default.py": "tests/conftest.py::tiny_run",
              "resnet110_cifar10.py": "test_resnet_cifar10_config_runs_on_mock_data",
              "mobilenetv2_cifar10.py": "test_cifar10_configs_run_on_mock_data",
              "vit_small_imagenet_r.py": "test_vit_imagenet_r_configs_run_on_mock_data",
              "vit_base_imagenet_r.py": "test_vit_imagenet_r_configs_run_on_mock_data",
              "vit_base_cifar10.py": "test_cifar10_configs_run_on_mock_data"}


def test_every_config_has_an_end_to_end_test():
  assert set(END_TO_END) == {os.path.basename(p) for p in CONFIGS}
  here = open(__file__).read()
  for test in END_TO_END.values():
    name = test.split("::")[-1]
    assert f"def {name}(" in here or f"def {name}(" in open(
        os.path.join(ROOT, test.split("::")[0])).read()


def _pretrained_accuracy_is_reported(workdir, res):
  pre = res["pretrain"]
  assert (pre["source"], pre["dataset"], pre["test_split"]) == ("train", "cifar100",
                                                                "cifar100/test")
  assert pre["train_images"] == 200 and pre["test_images"] == 200  # 2 and 2 per class
  correct = pre["test_accuracy"] * 200 / 100.0
  assert abs(correct - round(correct)) < 1e-6
  assert "augment crop_flip" in pre["recipe"] and "step schedule" in pre["recipe"]
  md = open(os.path.join(workdir, "results.md")).read()
  assert f"test accuracy {pre['test_accuracy']:.2f}%** on cifar100/test" in md


@pytest.mark.slow
@needs_tfds
def test_resnet_cifar10_config_runs_on_mock_data(tmp_path):
  cache = str(tmp_path / "pretrain_cache")
  cfg = load("resnet110_cifar10.py", "tiny")
  cfg.pretrain.cache_dir = cache
  with tfds.testing.mock_data(as_dataset_fn=CIFAR_FAKE):
    run_lib.run(cfg, str(tmp_path / "a"), show_progress=False)
    res = _check(str(tmp_path / "a"))
    assert res["data"]["counts"]["forget"] == 3
    _pretrained_accuracy_is_reported(str(tmp_path / "a"), res)
    assert res["timing"]["pretrain"]["cache_hit"] is False
    # Another #IPC and seed with the same backbone: no second pre-training (the sweep's jobs).
    other = load("resnet110_cifar10.py", "tiny")
    other.pretrain.cache_dir = cache
    other.data.images_per_class = 2
    other.seeds = (1,)
    other.methods = ("full", "retrain")
    run_lib.run(other, str(tmp_path / "b"), show_progress=False)
  again = _check(str(tmp_path / "b"))
  assert again["timing"]["pretrain"]["cache_hit"] is True
  assert again["pretrain"] == res["pretrain"]
  assert len(os.listdir(cache)) == 1


@pytest.mark.slow
@needs_tfds
@pytest.mark.parametrize("name", ["mobilenetv2_cifar10.py", "vit_base_cifar10.py"])
def test_cifar10_configs_run_on_mock_data(tmp_path, name):
  cfg = load(name, "tiny")
  with tfds.testing.mock_data(as_dataset_fn=CIFAR_FAKE):
    run_lib.run(cfg, str(tmp_path), show_progress=False)
  res = _check(str(tmp_path))
  assert res["model"]["name"] == cfg.model.name and res["data"]["forget_classes"] == [0]
  if name.startswith("mobilenetv2"):  # its backbone is pre-trained on CIFAR-100 here
    assert res["data"]["counts"]["forget"] == 3
    _pretrained_accuracy_is_reported(str(tmp_path), res)
  else:
    assert res["data"]["num_classes"] == 10


def _write_tiny_augreg(path):
  """A checkpoint in the AugReg layout for the tiny ViT, with an ImageNet-21k `pre_logits`."""
  shapes = _npz_layout(num_layers=2, d=16, heads=2, mlp=32, patch=16, grid=2, classes=21843)
  shapes["pre_logits/kernel"] = (16, 16)
  shapes["pre_logits/bias"] = (16,)
  return _write_npz(path, shapes)


@pytest.mark.slow
@needs_tfds
@pytest.mark.parametrize("name", ["vit_small_imagenet_r.py", "vit_base_imagenet_r.py"])
def test_vit_imagenet_r_configs_run_on_mock_data(tmp_path, name):
  cfg = load(name, "tiny")
  cfg.pretrain.source = "npz"
  cfg.pretrain.path = str(tmp_path / "augreg.npz")
  arrays = _write_tiny_augreg(cfg.pretrain.path)
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r):
    run_lib.run(cfg, str(tmp_path / "wd"), show_progress=False)
  res = _check(str(tmp_path / "wd"))
  assert res["data"]["num_classes"] == 4 and res["model"]["name"] == cfg.model.name
  # The paper's sampling: 4 of the 200 classes drawn at random, one of them forgotten.
  draw = res["data"]["per_seed"]["0"]
  assert draw["classes"] != [0, 1, 2, 3] and len(draw["classes"]) == 4
  assert len(draw["forget_classes"]) == 1
  assert res["pretrain"]["dropped"] == ["pre_logits/bias", "pre_logits/kernel"]
  from fastntk_jax.models import checkpoints  # pylint: disable=g-import-not-at-top
  stored = checkpoints.restore_checkpoint(
      str(tmp_path / "wd" / "pretrain"),
      _tiny_vit_variables(cfg, 4))
  np.testing.assert_array_equal(stored["params"]["cls"], arrays["cls"])


def _tiny_vit_variables(cfg, classes):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastntk_jax.models import get_model  # pylint: disable=g-import-not-at-top
  model = get_model(cfg.model.name, classes, **dict(cfg.model.options))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


@pytest.mark.parametrize("field, value", [("finetune.weight_decay", 1e-3),
                                          ("finetune.augment", "crop_flip"),
                                          ("unlearn.linearize_at", "trained")])
@pytest.mark.parametrize("solver", ["closed_form", "dual", "cg"])
def test_linearized_mode_refuses_what_it_would_ignore_or_change(field, value, solver):
  """Both solvers of the linearised objective ignore weight decay and augmentation; an update
  linearised at the trained params uses another model's Jacobian than f_lin's J(w0). All are
  refused, not run."""
  cfg = config_lib.base_config()
  cfg.finetune.mode, cfg.finetune.linearized_solver = "linearized", solver
  cfg.finetune.bn_mode = "frozen"
  config_lib.validate(cfg)
  group, name = field.split(".")
  cfg[group][name] = value
  with pytest.raises(ValueError, match=f"{field}=.*linearized"):
    config_lib.validate(cfg)


# --------------------------------------------------------------------------------------
# The exact (linearised) mode of the paper configs, and digits at their architectures.
# --------------------------------------------------------------------------------------

PAPER_CONFIGS = {"resnet110_cifar10.py": "closed_form", "mobilenetv2_cifar10.py": "dual",
                 "vit_small_imagenet_r.py": "dual", "vit_base_imagenet_r.py": "dual",
                 "vit_base_cifar10.py": "dual"}
LINEARIZED_FIELDS = ("finetune.mode", "finetune.linearized_solver", "finetune.bn_mode",
                     "unlearn.solve_dtype")


def _fields(cfg, names):
  return {n: cfg[n.split(".")[0]][n.split(".")[1]] for n in names}


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("name, solver", sorted(PAPER_CONFIGS.items()))
def test_every_paper_config_has_the_exact_mode(name, solver):
  """`:linearized` sets the exact mode with the solver its p allows (closed form for
  ResNet-110's 8,746, the dual where a p x p Gram is 15-59 GiB), through the one helper the
  default uses too (the same settings), and changes nothing else."""
  standard, exact = load(name), load(name, "linearized")
  config_lib.validate(exact)
  assert _fields(exact, LINEARIZED_FIELDS) == {
      "finetune.mode": "linearized", "finetune.linearized_solver": solver,
      "finetune.bn_mode": "frozen", "unlearn.solve_dtype": "float64"}
  default = load("default.py")  # the embedded default is linearised by the same helper
  assert _fields(default, LINEARIZED_FIELDS[:1] + LINEARIZED_FIELDS[2:]) == _fields(
      exact, LINEARIZED_FIELDS[:1] + LINEARIZED_FIELDS[2:])
  flat = lambda c: {k: v for k, v in _flat(c.to_dict()).items() if k not in LINEARIZED_FIELDS}
  assert flat(standard) == flat(exact)
  assert standard.finetune.mode == "standard"
  text = open(os.path.join(ROOT, "configs", name)).read()
  assert "linearized" in text and "GiB" in text  # the mode's cost, stated
  # the setting's arguments combine with it, in any order
  assert load(name, "tiny,linearized").finetune.mode == "linearized"


def test_a_bad_config_argument_names_the_accepted_ones():
  with pytest.raises(ValueError, match=r"bad config argument 'linear': expected one of "
                     r"\['tiny', 'linearized', 'digits'\] or key=int with key in \['ipc'\]"):
    load("resnet110_cifar10.py", "ipc=10,linear")
  with pytest.raises(ValueError, match="'digits'"):
    load("vit_small_imagenet_r.py", "digits")  # the ViTs load ImageNet weights: no digits


@pytest.mark.parametrize("name, model", [("resnet110_cifar10.py", "resnet110"),
                                         ("mobilenetv2_cifar10.py", "mobilenetv2"),
                                         ("vit_base_cifar10.py", "vit_ti16")])
def test_digits_at_the_papers_architecture(name, model):
  """`:digits`: scikit-learn's digits at 32x32x3 through the real network, pre-trained on
  the data's own pre-train split (no CIFAR), in either mode."""
  for arg in ("digits", "digits,linearized", "digits,ipc=7"):
    cfg = load(name, arg)
    config_lib.validate(cfg)
    assert cfg.model.name == model and cfg.data.name == "digits"
    assert cfg.data.image_size == 32 and cfg.data.num_classes is None
    assert (cfg.pretrain.source, cfg.pretrain.dataset) == ("train", "")
    assert cfg.data.pretrain_per_class == 50 and cfg.data.holdout_per_class == 30
    assert cfg.pretrain.train.augment == "none"
  # MobileNetV2's stale EMA statistics are recomputed after pre-training, in every mode
  # (RESULTS.md §22); the other networks keep them.
  for arg in ("digits", "digits,linearized", "digits,tiny", "linearized", "tiny", None):
    assert load(name, arg).pretrain.batch_stats == (
        "recompute" if model == "mobilenetv2" else "running")
  assert load(name, "digits,ipc=7").data.images_per_class == 7
  assert load(name, "digits").data.images_per_class == 5
  # CIFAR's #IPC unchanged
  assert load(name).data.images_per_class == (50 if model == "vit_ti16" else 100)


@pytest.mark.slow
def test_the_small_prompted_vit_on_digits_is_exact_when_linearised(tmp_path):
  """`vit_base_cifar10.py:digits,linearized,tiny`: the small prompted ViT, pre-trained from
  scratch on digits (no checkpoint, no TFDS), its prompts + head the trainable collection,
  Full and Retrain by the dual; Fast-NTK on Retrain."""
  cfg = load("vit_base_cifar10.py", "digits,linearized,tiny")
  assert cfg.finetune.linearized_solver == "dual" and cfg.pretrain.path == ""
  run_lib.run(cfg, str(tmp_path), show_progress=False)
  res = _check(str(tmp_path))
  assert res["model"]["name"] == "vit_ti16"
  assert res["pretrain"]["dataset"] == "digits (pretrain split)"
  fast = res["methods"]["fastntk"]
  assert fast["avg_gap"]["mean"] == 0.0
  # float32 solves in tiny mode (κ ~ 1e4): measured 4e-4 of ‖w_r − w0‖
  assert fast["relative_l2_to_retrain"]["mean"] < 1e-2


@pytest.mark.slow
def test_digits_linearized_runs_exact_end_to_end(tmp_path):
  """`resnet110_cifar10.py:tiny,digits,linearized` end to end on digits (no TFDS): the
  closed form from the pre-trained narrow ResNet, and Fast-NTK on Retrain."""
  cfg = load("resnet110_cifar10.py", "tiny,digits,linearized")
  run_lib.run(cfg, str(tmp_path), show_progress=False)
  res = _check(str(tmp_path))
  assert res["config"]["finetune"]["mode"] == "linearized"
  assert res["pretrain"]["dataset"] == "digits (pretrain split)"
  fast = res["methods"]["fastntk"]
  assert fast["avg_gap"]["mean"] == 0.0
  assert fast["relative_l2_to_retrain"]["mean"] < 1e-4
