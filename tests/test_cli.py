"""The command line: every config field can be overridden (lists and tuples too), every bad
flag is one line and exit code 2, and a CPU run's log starts with our own lines."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from optional import HAS_NEURAL_TANGENTS

from fastntk_jax import config as config_lib
from fastntk_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


def cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "fastntk_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def dry_run(*args) -> dict:
  proc = cli("--dry_run", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def assert_one_line_error(proc, *needles) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("fastntk_jax: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


# --------------------------------------------------------------------------------------------
# Overrides that work
# --------------------------------------------------------------------------------------------


def test_list_and_tuple_fields_from_the_command_line():
  # The case: without --config (the embedded default) a list field used to traceback.
  cfg = dry_run("--config.data.forget_classes=(3,)")
  assert cfg["data"]["forget_classes"] == [3]
  cfg = dry_run("--config.data.forget_classes=[3, 4]", "--config.seeds=0,1",
                "--config.methods=(full,retrain,fastntk)", "--config.data.num_classes=6")
  assert cfg["data"]["forget_classes"] == [3, 4]
  assert cfg["seeds"] == [0, 1] and cfg["methods"] == ["full", "retrain", "fastntk"]
  assert dry_run("--config.data.forget_classes=5")["data"]["forget_classes"] == [5]
  assert dry_run("--config.seeds=(7,)")["seeds"] == [7]


def test_scalars_none_placeholders_free_form_options_and_the_space_form():
  cfg = dry_run("--config=configs/default.py:tiny", "--config.unlearn.damping=1e-3",
                "--config.finetune.epochs", "3", "--config.data.data_dir=/data/tfds",
                "--config.data.images_per_class=None", "--config.data.classes=[1,2,3,4]",
                "--config.model.options.widths=(4,8,16)", "--config.model.options.shortcut=A",
                "--config.unlearn.solver=cg", "--config.finetune.learning_rate=1")
  assert cfg["unlearn"]["damping"] == 1e-3 and cfg["finetune"]["epochs"] == 3
  assert cfg["data"]["data_dir"] == "/data/tfds" and cfg["data"]["images_per_class"] is None
  assert cfg["data"]["classes"] == [1, 2, 3, 4]
  assert cfg["model"]["options"] == {"shortcut": "A", "widths": [4, 8, 16]}
  assert cfg["unlearn"]["solver"] == "cg" and cfg["finetune"]["learning_rate"] == 1.0
  # Later flags win; a whole free-form group can be given as a dict.
  cfg = dry_run("--config.unlearn.damping=1", "--config.unlearn.damping=2",
                "--config.model.options={'shortcut': 'A'}")
  assert cfg["unlearn"]["damping"] == 2.0 and cfg["model"]["options"] == {"shortcut": "A"}


def test_bare_lists_split_only_at_top_level_commas():
  # A regular expression's {m,n} stays one pattern ('head/.{1,3}' was silently split into
  # 'head/.{1' and '3}', two valid patterns that matched other names).
  parse = lambda raw: config_lib.parse_override_value("pretrain.dont_load", raw, tuple, ())
  assert parse("head/.{1,3}") == ("head/.{1,3}",)
  assert parse("(head/.{1,3})") == ("head/.{1,3}",)
  assert parse("head/.{1,3},(a|b),c") == ("head/.{1,3}", "(a|b)", "c")
  assert parse("head/.*,x") == ("head/.*", "x") and parse("3,") == (3,)
  assert parse("full,retrain") == ("full", "retrain") and parse("()") == ()


def _leaves(node, prefix=""):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and key != "options":
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", node, key


def _as_flag_text(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict())
  return repr(value)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_of_every_config_can_be_set_from_its_text(name):
  """Each leaf, written as text the way a user would, parses back to the same value."""
  path = os.path.join(ROOT, "configs", name)
  reference = config_lib.load_config_file(path)
  fields = list(_leaves(reference))
  assert len(fields) > 40, len(fields)
  overrides = [(field, _as_flag_text(node[key])) for field, node, key in fields]
  cfg = config_lib.apply_overrides(config_lib.load_config_file(path), overrides)
  assert cfg.to_json_best_effort(sort_keys=True) == reference.to_json_best_effort(sort_keys=True)


def test_changed_values_of_each_type_land_in_the_config():
  cfg = config_lib.apply_overrides(config_lib.base_config(), [
      ("seeds", "(4, 5)"), ("methods", "full,retrain"), ("data.forget_classes", "[1]"),
      ("data.num_classes", "3"), ("data.forget_fraction", "0.25"), ("data.name", "cifar10"),
      ("pretrain.images_per_class", "None"), ("unlearn.step_scale", "2"),
      ("eval.relearn_threshold", "inf")])
  assert cfg.seeds == (4, 5) and cfg.methods == ("full", "retrain")
  assert cfg.data.forget_classes == [1] and cfg.data.num_classes == 3
  assert cfg.data.forget_fraction == 0.25 and cfg.data.name == "cifar10"
  assert cfg.pretrain.images_per_class is None
  assert cfg.unlearn.step_scale == 2.0 and isinstance(cfg.unlearn.step_scale, float)
  assert cfg.eval.relearn_threshold == float("inf")
  # A text field keeps 'none' as text (augment='none' is a value); 'None' is None anywhere.
  cfg = config_lib.apply_overrides(config_lib.base_config(), [
      ("data.name", "none"), ("data.normalization", "None"), ("data.num_classes", "none")])
  assert cfg.data.name == "none" and cfg.data.normalization is None
  assert cfg.data.num_classes is None


def test_split_overrides():
  rest, overrides = main_lib.split_overrides(
      ["prog", "--workdir=w", "--config.a.b=1", "--config.c", "2", "-config.d=(1,)",
       "--config.e", "--noprogress", "--", "--config.f=1"])
  assert rest == ["prog", "--workdir=w", "--noprogress", "--", "--config.f=1"]
  assert overrides == [("a.b", "1"), ("c", "2"), ("d", "(1,)"), ("e", None)]


# --------------------------------------------------------------------------------------------
# Every bad flag: one line, exit code 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--config.data.forget_classes=(3"], ["--config.data.forget_classes=(3", "a list"]),
    (["--config.unlearn.dampin=1"], ["'unlearn.dampin'", "did you mean 'damping'"]),
    (["--config.unlern.damping=1"], ["'unlern'", "did you mean 'unlearn'"]),
    (["--config.unlearn.damping=big"], ["config.unlearn.damping", "a number", "'big'"]),
    (["--config.finetune.epochs=1.5"], ["config.finetune.epochs", "an int"]),
    (["--config.finetune.epochs"], ["config.finetune.epochs", "needs a value"]),
    (["--config.unlearn=1"], ["config.unlearn is a group"]),
    (["--config.seeds.first=1"], ["config.seeds is a value"]),
    (["--config.model.options=[1]"], ["config.model.options", "a dict"]),
    (["--config.unlearn.solver=svd"], ["config.unlearn.solver='svd'"]),      # validation
    (["--config.seeds=()"], ["config.seeds"]),                                 # validation
    (["--config.unlearn.damping=nan"], ["config.unlearn.damping=nan", "finite"]),
    (["--config.finetune.learning_rate=inf"], ["config.finetune.learning_rate=inf", "finite"]),
    (["--config.pretrain.images_per_class=0"], ["config.pretrain.images_per_class=0", "> 0"]),
    (["--config=configs/nonexistent.py"], ["configs/nonexistent.py", "does not exist"]),
    (["--config=configs/default.py:bogus"], ["bogus"]),                       # the file's argument
    (["--bogus_flag=1"], ["bogus_flag"]),                                      # absl's flags
    (["--workdir"], ["workdir"]),                                              # flag without value
    (["--workdir="], ["--workdir is empty"]),
    (["--config=README.md"], ["'README.md' is not a Python file"]),
    (["stray_argument"], ["unexpected arguments", "stray_argument"]),
    (["--config.finetune.loss=ce"], ["finetune.loss='ce'", "linearized", "finetune.mode='standard'"]),
    (["--config.finetune.bn_mode=train"], ["finetune.bn_mode='train'", "linearized"]),
], ids=["unbalanced-list", "unknown-field", "unknown-group", "not-a-number", "not-an-int",
        "missing-value", "group-as-value", "value-as-group", "options-not-dict", "bad-choice",
        "empty-seeds", "nan-damping", "inf-learning-rate", "pretrain-ipc-0", "missing-file", "bad-file-argument", "unknown-flag", "flag-no-value", "empty-workdir", "config-not-python",
        "positional", "ce-loss-in-linearized-mode", "bn-train-in-linearized-mode"])
def test_bad_flags_are_one_line_and_exit_2(args, needles):
  # With --dry_run the checks are the same; without it they also come before JAX starts.
  assert_one_line_error(cli("--dry_run", *args), *needles)


def test_bad_override_without_dry_run_fails_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  assert_one_line_error(cli("--config.data.forget_classes=(3", f"--workdir={workdir}"),
                        "forget_classes")
  assert not workdir.exists()


def test_config_file_that_does_not_import_is_one_line(tmp_path):
  bad = tmp_path / "broken.py"
  bad.write_text("def get_config(:\n  pass\n")
  assert_one_line_error(cli(f"--config={bad}", "--dry_run"), "broken.py", "SyntaxError")


def test_help_exits_0():
  proc = cli("--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--config" in proc.stdout and "--dry_run" in proc.stdout


# --------------------------------------------------------------------------------------------
# A CPU run's log starts with our own lines
# --------------------------------------------------------------------------------------------

CHATTER = re.compile(r"cudart_stub|oneDNN|cuda drivers|absl::InitializeLog|cpu_feature_guard|"
                     r"Unable to initialize backend|rebuild TensorFlow|signaling_client|"
                     r"^INFO:|^W0000|^I0000")


def test_cpu_run_log_starts_with_our_own_lines(tmp_path):
  # The dual solver takes neural-tangents' kernel where it is installed and named (which
  # imports TensorFlow): the run must stay quiet either way. (Under "auto" a dual over several
  # blocks keeps the Jacobian rows and takes the built-in kernel.)
  kernel = "neural_tangents" if HAS_NEURAL_TANGENTS else "auto"
  proc = cli("--config=configs/default.py:tiny", "--config.unlearn.solver=dual", "--noprogress",
             f"--config.unlearn.kernel_impl={kernel}", f"--workdir={tmp_path / 'w'}",
             timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert re.match(r"^I\d{4} .*main\.py:\d+\] config configs/default\.py:tiny", lines[0]), lines[:3]
  assert re.match(r"^I\d{4} .*\] jax \S+ on cpu \(\d+ devices?\); the dual solver's kernel: ",
                  next(l for l in lines if "the dual solver's kernel" in l))
  noise = [l for l in lines if CHATTER.search(l)]
  assert not noise, noise[:10]
  assert "| Fast-NTK |" in proc.stdout
  # neural-tangents' kernel wherever it is installed (the nt stack), the built-in one elsewhere.
  with open(tmp_path / "w" / "results.json") as f:
    fastntk = json.load(f)["methods"]["fastntk"]
  assert fastntk["solver"] == "dual"
  assert fastntk["kernel"] == ("neural_tangents" if HAS_NEURAL_TANGENTS else "jax"), fastntk


BLOCK_TFDS_AND_RUN_MAIN = """
import importlib.abc, runpy, sys

class _NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None

sys.meta_path.insert(0, _NoTensorFlow())
sys.argv = ["fastntk_jax.main"] + sys.argv[1:]
runpy.run_module("fastntk_jax.main", run_name="__main__")
"""


def test_cifar_without_the_tfds_extra_is_one_line_naming_the_extra(tmp_path):
  proc = subprocess.run([sys.executable, "-c", BLOCK_TFDS_AND_RUN_MAIN,
                         "--config=configs/resnet110_cifar10.py:tiny", "--noprogress",
                         f"--workdir={tmp_path / 'w'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fastntk_jax: error:")]
  assert len(errors) == 1 and "pip install -e '.[tfds]'" in errors[0], proc.stderr[-3000:]


BLOCK_NEURAL_TANGENTS_AND_RUN_MAIN = BLOCK_TFDS_AND_RUN_MAIN.replace(
    '("tensorflow", "tensorflow_datasets")', '("neural_tangents",)')


def test_neural_tangents_kernel_on_a_stack_without_it_is_one_line_before_any_work(tmp_path):
  # The lean stack: an explicit kernel_impl='neural_tangents' used to end, after pre-training
  # and fine-tuning, in a traceback (exit 1); now one line naming the nt stack and 'auto'.
  workdir = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-c", BLOCK_NEURAL_TANGENTS_AND_RUN_MAIN,
                         "--config=configs/default.py:tiny", "--noprogress",
                         "--config.unlearn.kernel_impl=neural_tangents",
                         f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fastntk_jax: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in ("neural-tangents", "pip install -e '.[nt,tfds]' -c constraints/nt.txt",
                 "--config.unlearn.kernel_impl=auto"):
    assert needle in errors[0], errors[0]
  assert not workdir.exists()


def test_runtime_line_replaces_jaxs_no_gpu_warning(monkeypatch):
  from fastntk_jax import devices  # pylint: disable=g-import-not-at-top
  line = main_lib.describe_runtime()
  assert re.match(r"^jax \S+ on \w+ \(\d+ devices?\); the dual solver's kernel: ", line), line
  monkeypatch.setattr(devices, "nvidia_driver_present", lambda: True)
  if " on cpu " in line:  # a CPU-only JAX on a machine with an NVIDIA driver: say so
    assert main_lib.describe_runtime().endswith(
        "an NVIDIA driver is present but this JAX runs on the CPU "
        "(python -m fastntk_jax.devices says why)")
  import logging  # pylint: disable=g-import-not-at-top
  names = ("", "absl", "fastntk_jax", "jax._src.xla_bridge")
  levels = {n: logging.getLogger(n).level for n in names}
  try:
    main_lib.quiet_library_logs()
    assert not logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.WARNING)
    assert logging.getLogger("fastntk_jax.pipeline").isEnabledFor(logging.INFO)
    assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
  finally:
    for n, level in levels.items():
      logging.getLogger(n).setLevel(level)
