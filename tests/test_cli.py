"""The command line: every config field can be overridden (lists and tuples too), every bad
flag is one line and exit code 2 before any work, and a CPU run's log starts with our own
lines. The flags are parsed in-process (`cli.parse_flags`, what `absl.app.run` calls); a few
subprocess runs check the whole command (the end-to-end tier)."""

import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from conftest import ROOT
from test_light_imports import BLOCK_TF

from fastntk_jax import cli
from fastntk_jax import config as config_lib
from fastntk_jax import main as main_lib  # defines the flags  # pylint: disable=unused-import

CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and f != "common.py")


def parse(*args) -> ml_collections.ConfigDict:
  """The config the command line `args` gives, validated (what `main` runs)."""
  flags.FLAGS.unparse_flags()
  rest = cli.parse_flags(["fastntk_jax", *args])
  assert rest == ["fastntk_jax"], rest
  return config_lib.validate(flags.FLAGS.config)


def refused(capsys, *args) -> str:
  """The one line of a refused command line (exit code 2)."""
  with pytest.raises(SystemExit) as e:
    flags.FLAGS.unparse_flags()
    cli.parse_flags(["fastntk_jax", *args])
    if flags.FLAGS.workdir is not None and not flags.FLAGS.workdir.strip():
      main_lib.main(["fastntk_jax"])
    config_lib.validate(flags.FLAGS.config)
  # Validation errors surface as ValueError here; main turns them into the line (below).
  assert e.value.code == 2, e.value.code
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fastntk_jax: error: "), lines
  return lines[0]


def cli_run(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "fastntk_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


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
  assert parse("--config.data.forget_classes=(3,)").data.forget_classes == (3,)
  cfg = parse("--config.data.forget_classes=(3, 4)", "--config.seeds=0,1",
              "--config.methods=('full','retrain','fastntk')", "--config.data.num_classes=6")
  assert cfg.data.forget_classes == (3, 4) and cfg.seeds == (0, 1)
  assert cfg.methods == ("full", "retrain", "fastntk")
  assert parse("--config.data.forget_classes=5").data.forget_classes == (5,)
  assert parse("--config.seeds=(7,)").seeds == (7,)


def test_scalars_none_free_form_options_and_the_config_after_its_overrides():
  cfg = parse("--config.unlearn.damping=1e-3", "--config.finetune.epochs=3",
              "--config.data.data_dir=/data/tfds", "--config.data.images_per_class=None",
              "--config.model.options.widths=(4,8,16)", "--config.model.options.shortcut=A",
              "--config.unlearn.solver=cg", "--config=configs/default.py:tiny")
  assert cfg.unlearn.damping == 1e-3 and cfg.finetune.epochs == 3
  assert cfg.data.data_dir == "/data/tfds" and cfg.data.images_per_class is None
  assert cfg.model.options.to_dict() == {"shortcut": "A", "widths": (4, 8, 16)}
  assert cfg.unlearn.solver == "cg" and cfg.data.num_classes == 4  # :tiny's own field
  # Later flags win; an earlier parse in the same process leaves nothing behind.
  assert parse("--config.unlearn.damping=1", "--config.unlearn.damping=2").unlearn.damping == 2
  assert parse().unlearn.damping == config_lib.base_config().unlearn.damping


def _leaves(node, prefix=""):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and key != "options":
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


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
  fields = [(f, v) for f, v in _leaves(reference) if not f.startswith("model.options")]
  assert len(fields) > 40, len(fields)
  cfg = parse(f"--config={path}", *(f"--config.{f}={_as_flag_text(v)}" for f, v in fields))
  assert cfg.to_json_best_effort(sort_keys=True) == reference.to_json_best_effort(sort_keys=True)


# --------------------------------------------------------------------------------------------
# Every bad flag: one line, exit code 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--config.unlearn.dampin=1"], ["'unlearn.dampin'", "did you mean 'damping'"]),
    (["--config.unlern.damping=1"], ["'unlern.damping'", "did you mean 'unlearn'"]),
    (["--config.unlearn.damping=big"], ["config.unlearn.damping", "'big'"]),
    (["--config.finetune.epochs=1.5"], ["config.finetune.epochs", "1.5"]),
    (["--config.finetune.epochs"], ["config.finetune.epochs", "Missing value"]),
    (["--config.unlearn=1"], ["config.unlearn", "not a dict"]),
    (["--config.seeds.first=1"], ["config.seeds is a value"]),
    (["--config.model.options=[1]"], ["config.model.options", "not a dict"]),
    (["--config=configs/nonexistent.py"], ["configs/nonexistent.py", "does not exist"]),
    (["--config=configs/default.py:bogus"], ["bogus"]),                       # the file's argument
    (["--config=configs/common.py"], ["get_config"]),                         # not a config
    (["--bogus_flag=1"], ["bogus_flag"]),                                      # absl's flags
    (["--workdir"], ["workdir"]),                                              # flag without value
    (["--config=README.md"], ["README.md"]),
    (["--config=configs/default.py:tiny", "--config.model.options.widths=abc"],
     ["config.model.options.widths is a tuple", "'abc' reads as a str", "(4, 8, 8)"]),
    (["--config=configs/default.py:tiny", "--config.model.options.shortcut=1"],
     ["config.model.options.shortcut is a str", "reads as an int"]),
], ids=["unknown-field", "unknown-group", "not-a-number", "not-an-int", "missing-value",
        "group-as-value", "value-as-group", "options-not-dict", "missing-file",
        "bad-file-argument", "not-a-config-file", "unknown-flag", "flag-no-value",
        "config-not-python", "model-option-of-another-type", "model-option-int-for-str"])
def test_bad_flags_are_one_line_and_exit_2(capsys, args, needles):
  line = refused(capsys, *args)
  for needle in needles:
    assert needle in line, line


# Values the flags parse but validation refuses, by name: {flag: what the error says}.
BAD_VALUES = {
    "bad-choice": ("--config.unlearn.solver=svd", ["config.unlearn.solver='svd'"]),
    "empty-seeds": ("--config.seeds=()", ["config.seeds"]),
    "negative-seed": ("--config.seeds=(-1,)", ["config.seeds=(-1,)", ">= 0"]),
    "repeated-seed": ("--config.seeds=(0,0)", ["config.seeds", "distinct"]),
    "nan-damping": ("--config.unlearn.damping=nan", ["config.unlearn.damping=nan", "finite"]),
    "zero-damping-linearized": ("--config.unlearn.damping=0", ["config.unlearn.damping=0", "> 0"]),
    "inf-learning-rate": ("--config.finetune.learning_rate=inf", ["config.finetune.learning_rate=inf", "finite"]),
    "pretrain-ipc-0": ("--config.pretrain.images_per_class=0", ["config.pretrain.images_per_class=0", "> 0"]),
    "ce-loss-in-linearized-mode": ("--config.finetune.loss=ce", ["finetune.loss='ce'", "linearized", "finetune.mode='standard'"]),
    "bn-train-in-linearized-mode": ("--config.finetune.bn_mode=train", ["finetune.bn_mode='train'", "linearized"]),
    "unknown-method": ("--config.methods=('fastntk','salum')", ["unknown method 'salum'"]),
    "repeated-method": ("--config.methods=('fastntk','fastntk')", ["names a method twice"]),
    "negative-tolerance": ("--config.unlearn.duplicate_tolerance=-1.0", ["duplicate_tolerance"]),
    "delta-1": ("--config.unlearn.delta=1.0", ["config.unlearn.delta=1.0", "(0, 1)"]),
    "epsilon-0": ("--config.unlearn.epsilon=0.0", ["config.unlearn.epsilon=0.0", "> 0"]),
    "release-epsilon-too-big": ("--config.unlearn.release_epsilons=(0.1,1000.0)",
                                ["config.unlearn.release_epsilons=1000.0", "(0, 100]"]),
    "zero-threshold": ("--config.unlearn.certify_threshold=0.0", ["certify_threshold"]),
    "certified-standard-mode": (("--config.unlearn.certified=True",
                                 "--config.finetune.mode=standard"),
                                ["certified=True", "finetune.mode='linearized'"]),
    "certified-without-fastntk": (("--config.unlearn.certified=True",
                                   "--config.methods=('full','retrain')"),
                                  ["certified=True", "does not run 'fastntk'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_by_validation_naming_the_field(case):
  flags_, needles = BAD_VALUES[case]
  with pytest.raises(ValueError) as e:
    parse(*(flags_ if isinstance(flags_, tuple) else (flags_,)))
  for needle in needles:
    assert needle in str(e.value), str(e.value)



def test_a_get_config_that_returns_no_config_is_one_line(capsys, tmp_path):
  bad = tmp_path / "none.py"
  bad.write_text("def get_config():\n  return None\n")
  assert "returned NoneType" in refused(capsys, f"--config={bad}")
  bad.write_text("def get_config(:\n  pass\n")
  assert "SyntaxError" in refused(capsys, f"--config={bad}")


def test_config_file_mistakes_are_one_line_naming_the_file_and_line(capsys, tmp_path):
  typo = tmp_path / "typo.py"
  typo.write_text("from fastntk_jax import config\n\ndef get_config():\n"
                  "  c = config.base_config()\n  c.unlearn.dampin = 1\n  return c\n")
  line = refused(capsys, f"--config={typo}")
  assert "unknown config field 'dampin'; did you mean 'damping'?" in line, line
  assert f"(at {typo}:5)" in line, line
  no_arg = tmp_path / "no_arg.py"
  no_arg.write_text("from fastntk_jax import config\n\ndef get_config():\n"
                    "  return config.base_config()\n")
  assert "takes no argument" in refused(capsys, f"--config={no_arg}:tiny")
  assert "needs a config file" in refused(capsys, "--config=")
  own = tmp_path / "own_check.py"  # the file's own TypeError / ValueError, located
  own.write_text("from fastntk_jax import config\n\ndef get_config():\n"
                 "  c = config.base_config()\n  c.finetune.epochs = 'ten'\n  return c\n")
  line = refused(capsys, f"--config={own}")
  assert "Could not set field 'epochs'" in line and f"(at {own}:5)" in line, line
  own.write_text("def get_config():\n  raise ValueError('my own check failed')\n")
  line = refused(capsys, f"--config={own}")
  assert "ValueError: my own check failed" in line and f"(at {own}:2)" in line, line
  colon = tmp_path / "dir:colon"
  colon.mkdir()
  (colon / "c.py").write_text("")
  line = refused(capsys, f"--config={colon / 'c.py'}:tiny")
  assert "a path with ':' in it cannot be loaded" in line, line
  line = refused(capsys, "--config=configs/nonexistent.py:tiny")
  assert "'configs/nonexistent.py' does not exist (':tiny' is its argument)" in line, line


def test_a_workdir_that_is_a_file_is_one_line(capsys, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  flags.FLAGS.unparse_flags()
  cli.parse_flags(["fastntk_jax", "--config=configs/default.py:tiny", f"--workdir={afile}"])
  with pytest.raises(SystemExit) as e:
    main_lib.main(["fastntk_jax"])
  assert e.value.code == 2
  line = capsys.readouterr().err.strip()
  assert "is a file, not a folder" in line and "\n" not in line, line


def test_help_exits_0():
  proc = cli_run("--help")  # no JAX is started: about a second
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--config" in proc.stdout and "--dry_run" in proc.stdout


def test_errors_are_one_short_line():
  assert cli.short_error(OSError(28, "No space left on device", "/w/x")) == (
      "No space left on device: /w/x")
  spec = '{"driver": "file", "path": "/w/pretrain/d/x"} ' * 40
  line = cli.short_error(ValueError(f"Error writing \"/w/pretrain/d/x\": No space left on device {spec}"))
  assert line == "No space left on device: /w/pretrain/d/x"
  assert len(cli.short_error(ValueError("x" * 5000))) <= cli.LONGEST_LINE + 4


@pytest.mark.slow
def test_a_bad_command_fails_in_one_line_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  assert_one_line_error(cli_run("--config.seeds=(-1,)", f"--workdir={workdir}"),
                        "config.seeds=(-1,)")
  assert_one_line_error(cli_run("--config.model.options.widths=(4,8)",
                                "--config=configs/default.py:tiny", f"--workdir={workdir}"),
                        "config.model", "does not build")
  assert not workdir.exists()  # refused before the workdir was created
  assert_one_line_error(cli_run("stray_argument"), "unexpected arguments", "stray_argument")
  assert_one_line_error(cli_run("--workdir="), "--workdir is empty")
  none = tmp_path / "none.py"  # config_flags' own warning about it stays out of the line
  none.write_text("def get_config():\n  pass\n")
  assert_one_line_error(cli_run(f"--config={none}", "--dry_run"), "returned NoneType")


# --------------------------------------------------------------------------------------------
# A CPU run's log starts with our own lines
# --------------------------------------------------------------------------------------------

CHATTER = re.compile(r"cudart_stub|oneDNN|cuda drivers|absl::InitializeLog|cpu_feature_guard|"
                     r"Unable to initialize backend|rebuild TensorFlow|signaling_client|"
                     r"^INFO:|^W0000|^I0000")


def assert_our_own_log(stderr: str, config_arg: str) -> None:
  """A CPU run's log starts with our own lines and holds no library chatter (the nt stack's
  TensorFlow import included); the command-line run of tests/test_preemption.py checks it."""
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert re.match(r"^I\d{4} .*main\.py:\d+\] config --config=" + re.escape(config_arg), lines[0]), lines[:3]
  assert re.match(r"^I\d{4} .*\] jax \S+ on cpu \(\d+ devices?\); the dual solver's kernel: ",
                  next(l for l in lines if "the dual solver's kernel" in l))
  noise = [l for l in lines if CHATTER.search(l)]
  assert not noise, noise[:10]


# test_light_imports' blocker of TensorFlow and TFDS, then the command line.
BLOCK_TFDS_AND_RUN_MAIN = BLOCK_TF + textwrap.dedent("""
  import runpy
  sys.argv = ["fastntk_jax.main"] + sys.argv[1:]
  runpy.run_module("fastntk_jax.main", run_name="__main__")
""")


@pytest.mark.slow
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


@pytest.mark.slow
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
  line = cli.describe_runtime()
  assert re.match(r"^jax \S+ on \w+ \(\d+ devices?\); the dual solver's kernel: ", line), line
  monkeypatch.setattr(devices, "nvidia_driver_present", lambda: True)
  if " on cpu " in line:  # a CPU-only JAX on a machine with an NVIDIA driver: say so
    assert cli.describe_runtime().endswith(
        "an NVIDIA driver is present but this JAX runs on the CPU "
        "(python -m fastntk_jax.devices says why)")
  import logging  # pylint: disable=g-import-not-at-top
  names = ("", "absl", "fastntk_jax", "jax._src.xla_bridge")
  levels = {n: logging.getLogger(n).level for n in names}
  try:
    cli.quiet_library_logs()
    assert not logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.WARNING)
    assert logging.getLogger("fastntk_jax.experiment.run").isEnabledFor(logging.INFO)
    assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
  finally:
    for n, level in levels.items():
      logging.getLogger(n).setLevel(level)


def test_a_signing_key_inside_the_workdir_is_one_line_and_writes_nothing(capsys, tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  flags.FLAGS.unparse_flags()
  cli.parse_flags(["fastntk_jax", "--config=configs/default.py:tiny", f"--workdir={workdir}",
                   f"--config.unlearn.signing_key={workdir / 'key.pem'}"])
  with pytest.raises(SystemExit) as e:
    main_lib.main(["fastntk_jax"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "lies inside the workdir" in err and "\n" not in err, err
  assert os.listdir(workdir) == []  # no key, no traceback file, no claim
