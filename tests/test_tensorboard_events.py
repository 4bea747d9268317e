"""TensorBoard logs: the pipeline's event file is written without TensorFlow and reads back."""

import glob
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITE = textwrap.dedent("""
  import json, sys
  from fastntk_jax.experiment.progress import Progress as _Progress
  before = "tensorflow" in sys.modules
  progress = _Progress(sys.argv[1], enabled=False)
  update = progress.epochs("finetune_seed0", 3)
  for epoch, loss in enumerate([1.5, 0.75, 0.25]):
    update(epoch, loss)
  progress.close()
  print(json.dumps({"tf_before": before, "tf_after": "tensorflow" in sys.modules,
                    "writer_closed": progress.writer is None}))
""")


def test_event_file_is_written_without_tensorflow_and_reads_back(tmp_path):
  proc = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "TensorBoard logging disabled" not in proc.stderr, proc.stderr[-2000:]
  # Writing the scalars imports no TensorFlow, even where it is installed.
  assert out == {"tf_before": False, "tf_after": False, "writer_closed": True}, out

  files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert len(files) == 1, files
  # Read back as TensorBoard does (with TensorFlow where it is installed, its stub elsewhere).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert acc.Tags()["tensors"] == ["finetune_seed0/loss"], acc.Tags()
  events = acc.Tensors("finetune_seed0/loss")
  assert [e.step for e in events] == [0, 1, 2]
  values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
  assert values == [1.5, 0.75, 0.25]


def test_two_writers_in_one_second_do_not_overwrite_each_other(tmp_path):
  from fastntk_jax.experiment.progress import Progress as _Progress  # pylint: disable=g-import-not-at-top
  for _ in range(2):
    progress = _Progress(str(tmp_path), enabled=False)
    progress.epochs("a", 1)(0, 1.0)
    progress.close()
  files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert len(files) == 2 and all(os.path.getsize(f) > 0 for f in files), files
