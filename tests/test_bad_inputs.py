"""Bad input through every door of a run: a clear error naming the problem, before any work,
nothing written (the command line turns each into one line and exit code 2: test_cli.py)."""

import dataclasses
import os
import re

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from optional import needs_tfds

from fastntk_jax import cli
from fastntk_jax import workdir as wd
from fastntk_jax.experiment import prepare as prepare_lib
from fastntk_jax.experiment import run as run_lib


def refused(cfg, workdir, *needles, error=ValueError) -> str:
  with pytest.raises(error) as e:
    run_lib.run(cfg, str(workdir), show_progress=False)
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  return str(e.value)


def tiny(**fields):
  cfg = tiny_config()
  with cfg.unlocked():
    for dotted, value in fields.items():
      node = cfg
      *groups, key = dotted.split("__")
      for g in groups:
        node = node[g]
      node[key] = value
  return cfg


@pytest.mark.parametrize("fields,needles", [
    ({"unlearn__solver": "svd"}, ["config.unlearn.solver='svd'"]),
    ({"seeds": (-1,)}, ["config.seeds=(-1,)"]),
    ({"data__forget_classes": (7,)}, ["forget_classes"]),          # not a chosen class
    ({"data__images_per_class": 500}, ["images_per_class"]),       # #IPC too large
    ({"data__num_classes": 2, "data__forget_classes": (0, 1)}, ["forget_classes"]),
    ({"model__options": {"shortcut": "B", "widths": (4, 8)}}, ["config.model", "widths"]),
    ({"model__options": {"shortcut": "B", "widhts": (4, 8, 8)}}, ["widhts"]),
    ({"finetune__mode": "standard", "unlearn__solver": "primal", "unlearn__damping": 0.0},
     ["damping=0"]),
    ({"finetune__mode": "standard", "unlearn__damping": 0.0}, ["unlearn.damping=0.0", "> 0"]),
    ({"model__options": {"shortcut": None}}, ["model.options.shortcut=None"]),
    ({"methods": ("full", "retrain", "fastntk,max_loss")},
     ["one name with commas", """'("fastntk","max_loss")'"""]),
    ({"pretrain__source": "npz", "pretrain__path": "/no/such/vit.npz"},
     ["config.pretrain.path='/no/such/vit.npz'", "no such file"]),
    ({"pretrain__source": "checkpoint", "pretrain__path": "/no/such/pretrain"},
     ["no such folder"]),
], ids=["bad-solver", "negative-seed", "forget-class", "ipc", "empty-retain",
        "model-that-does-not-build", "unknown-model-option", "zero-damping-primal",
        "zero-damping-fastntk", "model-option-none", "methods-as-one-string",
        "missing-checkpoint-file", "missing-checkpoint-folder"])
def test_refused_before_the_workdir_is_touched(fields, needles, tmp_path):
  refused(tiny(**fields), tmp_path / "w", *needles)
  assert not (tmp_path / "w").exists()


def test_a_config_lacking_a_schema_field_is_refused_naming_it(tmp_path):
  cfg = tiny()
  with cfg.unlocked():
    del cfg.eval["probe"]
  refused(cfg, tmp_path / "w", "config.eval lacks the field(s) ['probe']", "base_config")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["repeated", "also-retained"])
def test_a_forget_set_with_a_repeated_or_retained_sample_is_refused_before_training(
    where, tmp_path, monkeypatch):
  """Retrain on D_r would have seen such a sample: refused when the data is loaded."""
  load = prepare_lib.data_splits.load_unlearning_data

  def load_with_a_copy(c):
    data = load(c)
    forget, retain = data.forget, data.retain
    if where == "repeated":  # the last forget sample replaced by the first
      x = forget.x.copy()
      x[-1] = x[0]
      forget = dataclasses.replace(forget, x=x, y=forget.y.copy())
    else:  # the first forget sample copied into D_r, shifted by far less than the tolerance
      retain = dataclasses.replace(
          retain, x=np.concatenate([retain.x, forget.x[:1] + 1e-7]),
          y=np.concatenate([retain.y, forget.y[:1]]),
          index=np.concatenate([retain.index, forget.index[:1]]))
    return dataclasses.replace(data, forget=forget, retain=retain)

  monkeypatch.setattr(prepare_lib.data_splits, "load_unlearning_data", load_with_a_copy)
  needle = "more than once" if where == "repeated" else "also in the retain set"
  cfg = tiny(unlearn__duplicate_tolerance=1e-6)
  message = refused(cfg, tmp_path / "w", needle, "forget classes", "duplicate_tolerance")
  assert "forget rows [" in message
  assert not (tmp_path / "w").exists()


def test_the_corrected_command_runs_where_a_refused_one_was_given(tmp_path):
  """A refused config leaves no config.json behind to refuse the corrected one with."""
  refused(tiny(model__options={"shortcut": "B", "widths": (4, 8)}), tmp_path / "w", "widths")
  cfg = tiny()
  wd.claim(str(tmp_path / "w"), cfg)  # the corrected config claims the workdir


def test_corrupt_checkpoint(tmp_path):
  bad = tmp_path / "ckpt"
  bad.mkdir()
  (bad / "garbage").write_bytes(b"not a checkpoint")
  refused(tiny(pretrain__source="checkpoint", pretrain__path=str(bad)), tmp_path / "w", "ckpt")


def test_truncated_npz(tmp_path):
  from configs import common  # pylint: disable=g-import-not-at-top
  npz = tmp_path / "vit.npz"
  np.savez(npz, **{"Transformer/encoder_norm/scale": np.ones(16, np.float32)})
  npz.write_bytes(npz.read_bytes()[:40])  # truncated
  cfg = common.vit_prompt_config("vit_s16", "imagenet_r", 4, 2, "", True)
  cfg.data.name = "digits"
  cfg.pretrain.source = "npz"
  cfg.pretrain.path = str(npz)
  refused(cfg, tmp_path / "w", "vit.npz")


@needs_tfds
def test_dataset_not_prepared_names_the_fix(tmp_path):
  from fastntk_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "resnet110_cifar10.py:tiny"))
  cfg.data.data_dir = str(tmp_path / "empty")
  line = refused(cfg, tmp_path / "w", "download_and_prepare", "cifar10")
  assert str(tmp_path / "empty") in line
  assert not (tmp_path / "w").exists()


def test_workdir_of_other_config_is_refused_and_left_untouched(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"seeds": [5]}\n')
  (workdir / "results.json").write_text("earlier results\n")
  refused(tiny(), workdir, "different config", error=wd.WorkdirConflictError)
  assert (workdir / "results.json").read_text() == "earlier results\n"
  assert (workdir / "config.json").read_text() == '{"seeds": [5]}\n'


@pytest.mark.parametrize("content, needle", [('{"seeds": [0]', "is not a config"),
                                             ("[]", "holds a list, not a config")])
def test_a_workdir_whose_config_json_is_not_a_config_is_refused_naming_it(
    content, needle, tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "config.json").write_text(content)
  refused(tiny(), tmp_path / "w", "config.json", needle, error=wd.WorkdirConflictError)


def test_a_workdir_held_by_another_run_is_refused(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  holder = ("import sys, time\nfrom fastntk_jax import workdir as wd\n"
            "with wd.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(60)\n")
  proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "w")],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    line = refused(tiny(), tmp_path / "w", "in use by another run", f"pid {proc.pid}",
                   error=wd.WorkdirBusyError)
    assert "config.json" not in os.listdir(tmp_path / "w"), line
  finally:
    proc.kill()
    proc.wait()
  with wd.hold(str(tmp_path / "w")):  # the killed holder's lock is taken over
    pass


def test_a_traceback_that_cannot_go_to_the_workdir_goes_to_a_temporary_file(tmp_path):
  (tmp_path / "error_traceback.txt").mkdir()  # opening it for writing fails
  try:
    raise ValueError("boom")
  except ValueError:
    path = cli.save_traceback(str(tmp_path))
  assert not path.startswith(str(tmp_path)), path
  assert "ValueError: boom" in open(path).read()


@pytest.mark.slow
def test_a_refusal_after_the_workdir_is_claimed_is_one_line_keeping_its_traceback(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "ckpt"  # looks finished (its format passes prepare), unreadable inside
  bad.mkdir()
  (bad / "_CHECKPOINT_METADATA").write_text("not orbax metadata")
  proc = subprocess.run([sys.executable, "-m", "fastntk_jax.main", "--noprogress",
                         "--config=configs/default.py:tiny", f"--workdir={tmp_path / 'w'}",
                         "--config.pretrain.source=checkpoint", f"--config.pretrain.path={bad}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("fastntk_jax: error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  # One line on the terminal, but the traceback is kept (the same exception types come from
  # bugs, which a bare line would hide): the line names the file holding it.
  match = re.search(r"\(traceback: (.+)\)$", lines[0])
  assert match, lines[0]
  kept = open(match.group(1)).read()
  assert kept.startswith("Traceback") and "ckpt" in kept, kept[-2000:]


@pytest.mark.parametrize("source, name, content, needle", [
    ("npz", "vit.npz", b"not a zip", "not an .npz archive"),
    ("state_dict", "resnet.safetensors", b"\x10\x00", "not a .safetensors file"),
    ("state_dict", "resnet.pt", b"plain text", "not a PyTorch file"),
    ("state_dict", "resnet.h5", b"", "unknown state-dict format"),
    ("checkpoint", "pretrain", None, "not a finished checkpoint folder"),
])
def test_a_pretrained_file_that_cannot_be_read_is_refused_before_the_workdir(
    source, name, content, needle, tmp_path):
  """Found in the pretrain stage, after the workdir was claimed, the corrected command was
  then refused as 'a different config'."""
  path = tmp_path / name
  if content is None:
    path.mkdir()
  else:
    path.write_bytes(content)
  refused(tiny(pretrain__source=source, pretrain__path=str(path)), tmp_path / "w",
          "config.pretrain.path=", needle)
  assert not (tmp_path / "w").exists()
