"""What stays out of memory: the config and the data package import no JAX, Flax, Optax or
TensorFlow, and the digits default loads with TensorFlow and tensorflow-datasets unimportable."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow_datasets", "neural_tangents")

# Makes `import tensorflow` / `import tensorflow_datasets` (and their submodules) fail, as on a
# machine where neither is installed, even though this environment has them.
BLOCK_TF = textwrap.dedent("""
  import importlib.abc, sys

  class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
      return None

  sys.meta_path.insert(0, _NoTensorFlow())
""")


def run_python(code: str) -> dict:
  """Runs `code` in a fresh interpreter (repository root on the path); returns its JSON output."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def heavy_loaded_after(statement: str) -> list[str]:
  out = run_python(f"import json, sys\n{statement}\n"
                   f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
  return out


@pytest.mark.parametrize("statement", [
  "import fastntk_jax.config",
  "from fastntk_jax import config; config.validate(config.base_config())",
  "import fastntk_jax.enums",
  "import fastntk_jax.data",
])
def test_import_leaves_heavy_modules_out(statement):
  assert heavy_loaded_after(statement) == []


def test_digits_load_without_tensorflow_and_tfds_raise_naming_the_extra():
  code = BLOCK_TF + textwrap.dedent("""
    import json
    try:
      import tensorflow
      blocked = False
    except ImportError:
      blocked = True
    from fastntk_jax import config
    from fastntk_jax import data
    config.validate(config.base_config())
    d = data.load_unlearning_data()
    cifar_cfg = data.resolve_data_config(name="cifar10")  # validating needs no TensorFlow
    errors = {}
    for name in ("cifar10", "cifar100", "imagenet_r"):
      try:
        data.load_unlearning_data(name=name)
        errors[name] = None
      except ImportError as e:
        errors[name] = str(e)
    print(json.dumps({
      "blocked": blocked,
      "counts": d.counts(),
      "sums": {k: float(s.x.astype("float64").sum()) for k, s in d.splits().items()},
      "retain_index": d.retain.index.tolist(),
      "errors": errors,
      "tf_loaded": sorted(m for m in sys.modules if m.split(".")[0] in
                          ("tensorflow", "tensorflow_datasets")),
    }))
  """)
  out = run_python(code)
  assert out["blocked"]  # the finder works: TensorFlow really is unimportable in the child
  assert out["counts"] == {"pretrain": 800, "retain": 540, "forget": 60, "test_retain": 270,
                           "test_forget": 30}
  # The same images as loading with TensorFlow importable (this process).
  from fastntk_jax import data
  d = data.load_unlearning_data()
  np.testing.assert_array_equal(out["retain_index"], d.retain.index)
  for key, s in d.splits().items():
    np.testing.assert_allclose(out["sums"][key], s.x.astype(np.float64).sum(), rtol=1e-12)
  for name, message in out["errors"].items():
    assert message is not None, f"{name} loaded without TensorFlow Datasets"
    assert "pip install -e '.[tfds]'" in message, message
    assert repr(name) in message and "tensorflow" in message, message
  assert out["tf_loaded"] == []


def test_tfds_install_hint_is_the_extra():
  from fastntk_jax import data
  assert data.TFDS_INSTALL == "pip install -e '.[tfds]'"


def test_moved_value_lists_keep_their_old_names_and_values():
  from fastntk_jax import enums, models, train
  assert train.LOSSES == ("mse", "ce") and train.OPTIMIZERS == ("sgd", "adam")
  assert train.BN_MODES == ("frozen", "train")
  assert models.MODEL_NAMES == ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56",
                                "resnet110", "mobilenetv2", "vit_ti16", "vit_s16", "vit_b16")
  assert models.MODEL_NAMES == enums.values(enums.ModelName)
  for name in models.MODEL_NAMES:  # every name the config accepts builds (no init: cheap)
    assert models.get_model(name, num_classes=3) is not None
  assert enums.parse(enums.BNMode, "train", name="bn_mode") is enums.BNMode.TRAIN
  assert enums.Loss.MSE == "mse"  # str enums: the library's string comparisons keep working


@pytest.mark.parametrize("field,value,allowed", [
  ("finetune.optimizer", "rmsprop", "['sgd', 'adam']"),
  ("finetune.loss", "l1", "['mse', 'ce']"),
  ("finetune.bn_mode", "eval", "['frozen', 'train']"),
  ("model.name", "resnet9", "'resnet8'"),
  ("pretrain.dataset", "mnist", "'cifar100'"),
  ("unlearn.solver", "svd", "['dual', 'primal', 'cg', 'auto']"),
  ("unlearn.kernel_impl", "nt", "'neural_tangents_ntk_vector_products'"),
  ("unlearn.linearize_at", "w0", "['init', 'trained']"),
  ("unlearn.solve_dtype", "float16", "['float32', 'float64']"),
])
def test_config_checks_the_enum_values(field, value, allowed):
  from fastntk_jax import config
  cfg = config.base_config()
  node = cfg
  *path, leaf = field.split(".")
  for part in path:
    node = node[part]
  setattr(node, leaf, value)
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r} is not valid") as e:
    config.validate(cfg)
  assert allowed in str(e.value)
