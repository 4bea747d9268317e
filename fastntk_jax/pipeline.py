"""The main job: pre-train → fine-tune (Full) → Retrain → unlearn (Fast-NTK, Max Loss,
Random Label) → evaluate, for several seeds, resumable stage by stage.

Every stage writes its result atomically into the workdir and is skipped when that result
is already there, so a killed run restarted with the same command continues where it
stopped and ends with the same numbers. A workdir holding another config is refused.

Workdir layout:
  config.json                  the validated config (compared on restart)
  pretrain/                    pre-trained variables (orbax)
  seed_<s>/<method>/           trainable params (+ batch_stats) of each method (orbax)
  seed_<s>/<method>.json       that method's metrics
  seed_<s>/probe_<kind>.json   linear-probe accuracies
  results.json, results.md, *.png, tb/   the report (see `fastntk_jax.report`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from fastntk_jax import audit
from fastntk_jax import config as config_lib
from fastntk_jax import data as data_lib
from fastntk_jax import faults
from fastntk_jax import klom
from fastntk_jax import mia
from fastntk_jax import pretraining
from fastntk_jax import report
from fastntk_jax import sharding
from fastntk_jax import train as train_lib
from fastntk_jax import unlearn
from fastntk_jax.unlearn import linear
from fastntk_jax import workdir as wd
from fastntk_jax.models import checkpoints
from fastntk_jax.models import get_model
from fastntk_jax.models import trainable as tr

log = logging.getLogger(__name__)
PyTree = Any


def train_spec(c: ml_collections.ConfigDict, **overrides) -> train_lib.TrainSpec:
  """TrainSpec from a config group made by `config._train`."""
  fields = dict(epochs=c.epochs, learning_rate=float(c.learning_rate), batch_size=c.batch_size,
                optimizer=c.optimizer, momentum=float(c.momentum),
                weight_decay=float(c.weight_decay), loss=c.loss, bn_mode=c.bn_mode,
                augment=c.augment, schedule=c.schedule,
                warmup_epochs=float(c.warmup_epochs),
                decay_epochs=tuple(int(e) for e in c.decay_epochs),
                decay_factor=float(c.decay_factor))
  fields.update(overrides)
  return train_lib.TrainSpec(**fields)


class _Progress:
  """A tqdm bar per stage, plus TensorBoard scalars of the per-epoch loss.

  The event file (`workdir/tb/events.out.tfevents.*`) is written through the `tensorboard`
  package's own `tensorboard.summary.Writer`, with no TensorFlow: its `DirectoryOutput` opens
  files through `tensorboard.compat.tf`, which imports TensorFlow whenever it is installed
  (seconds, and TF's log chatter), so the records go to a plain file here (`_event_output`).
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.writer = None
    try:
      from tensorboard.summary import Writer  # pylint: disable=g-import-not-at-top
      self.writer = Writer(self._event_output(os.path.join(workdir, "tb")))
    except Exception as e:  # TensorBoard logging is a convenience, never a failure
      log.warning("TensorBoard logging disabled: %r", e)

  @staticmethod
  def _event_output(logdir: str):
    """A `tensorboard.summary.Output` writing TFRecord-framed `Event` protos to a new file."""
    # pylint: disable=g-import-not-at-top
    import socket
    import uuid
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary import Output
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.util import tensor_util
    # pylint: enable=g-import-not-at-top

    class EventFileOutput(Output):
      """What `DirectoryOutput` writes (same records, same protos), synchronously."""

      def __init__(self):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                 f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._records = RecordWriter(open(self.path, "wb"))  # pylint: disable=consider-using-with
        self._records.write(event_pb2.Event(wall_time=time.time(),
                                            file_version="brain.Event:2").SerializeToString())
        self._records.flush()

      def emit_scalar(self, *, plugin_name, tag, data, step, wall_time, tag_metadata=None,
                      description=None):
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name,
                                                               content=tag_metadata),
            summary_description=description,
            data_class=summary_pb2.DataClass.DATA_CLASS_SCALAR)
        event = event_pb2.Event(wall_time=wall_time, step=int(step))
        event.summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(data),
                                metadata=metadata)
        self._records.write(event.SerializeToString())

      def flush(self):
        self._records.flush()

      def close(self):
        self._records.close()

    return EventFileOutput()

  def epochs(self, tag: str, total: int) -> Callable[[int, float], None]:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, desc=tag, leave=False, disable=not self.enabled, unit="ep")

    def update(epoch: int, loss: float):
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}")
      if self.writer is not None:
        self.writer.add_scalar(f"{tag}/loss", float(loss), int(epoch))
        self.writer.flush()  # per epoch: a killed run keeps the curve so far
      if epoch + 1 >= total:
        bar.close()

    return update

  def close(self):
    if self.writer is not None:
      self.writer.close()  # flushes
      self.writer = None


def _init_variables(model, image_shape, seed: int) -> dict:
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(seed), x)))


def pretrain_stage(cfg, model, data, workdir: str, progress: _Progress, mesh=None) -> dict:
  """The backbone every method starts from: trained here or in the shared cache, loaded, or
  random. What it is (and, when trained, its test accuracy) goes to `pretrain.json`
  (`pretrain_info`), written before the checkpoint, so a resumed run still reports it."""
  path = os.path.join(workdir, "pretrain")
  info_path = os.path.join(workdir, PRETRAIN_INFO)
  init = _init_variables(model, data.image_shape, seed=10_000)
  if os.path.isdir(path):
    return checkpoints.restore_checkpoint(path, init)
  source = cfg.pretrain.source
  info = {"source": source}
  if source == "train" and cfg.pretrain.dataset:
    spec = train_spec(cfg.pretrain.train)
    size, norm = data.image_shape[0], data.config.normalization
    epochs = progress.epochs(f"pretrain/{cfg.pretrain.dataset}", spec.epochs)
    if cfg.pretrain.cache_dir:
      pre_vars, info, cache = pretraining.load_or_train(
          cfg, spec, size, norm, cfg.pretrain.cache_dir, progress=epochs,
          eval_batch_size=cfg.eval.batch_size, mesh=mesh)
      info = {**info, **cache}
    else:
      pre_vars, info = pretraining.train_backbone(
          cfg, spec, size, norm, progress=epochs, checkpoint_path=path + ".partial",
          eval_batch_size=cfg.eval.batch_size, mesh=mesh)
    info["cache_key"] = pretraining.cache_key(cfg, size, norm)[1]
    variables = pretraining.transfer(pre_vars, init)
  elif source == "train":
    if data.pretrain is None or data.pretrain.size == 0:
      raise ValueError("config.pretrain.source='train' but the data has no pretrain split; set "
                       "data.pretrain_per_class > 0 or use pretrain.source='npz'/'checkpoint'")
    start = time.perf_counter()
    spec = train_spec(cfg.pretrain.train)
    trained = {"params": init["params"], "trainable": init["trainable"]}
    frozen = {k: v for k, v in init.items() if k not in trained}
    trained, stats, history = train_lib.fit_collections(
        model, trained, frozen, data.pretrain, spec, data.num_classes, seed=10_000,
        progress=progress.epochs("pretrain", spec.epochs),
        checkpoint_path=os.path.join(workdir, "pretrain.partial"), tag="pretrain", mesh=mesh)
    variables = {**frozen, **trained}
    if stats is not None:
      variables["batch_stats"] = stats
    test = data.test  # the task's hold-out: same classes, same head
    info.update(dataset=f"{data.config.name} (pretrain split)", train_images=data.pretrain.size,
                test_split=f"{test.source} (hold-out)", test_images=test.size,
                test_accuracy=pretraining.accuracy(model, variables, test, cfg.eval.batch_size),
                final_train_loss=float(history[-1]) if history else None,
                epochs=spec.epochs, recipe=spec.describe(),
                seconds=time.perf_counter() - start)
  elif source == "npz":
    loaded = {}
    variables = checkpoints.load_vit_npz(cfg.pretrain.path, init,
                                         dont_load=tuple(cfg.pretrain.dont_load), report=loaded)
    info.update(path=cfg.pretrain.path, **loaded)
  elif source == "state_dict":
    from fastntk_jax.models import torch_import  # pylint: disable=g-import-not-at-top
    variables = torch_import.load_cifar_resnet(cfg.pretrain.path, init,
                                               dont_load=tuple(cfg.pretrain.dont_load))
    info["path"] = cfg.pretrain.path
  elif source == "checkpoint":
    variables = checkpoints.restore_checkpoint(cfg.pretrain.path, init)
    info["path"] = cfg.pretrain.path
  else:  # "none": a randomly initialised backbone
    variables = init
  if info.get("test_accuracy") is not None:
    log.info("pre-trained backbone: test accuracy %.2f%% on %s (%d images)",
             info["test_accuracy"], info["test_split"], info["test_images"])
  wd.atomic_write_json(info_path, info)
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  checkpoints.save_checkpoint(path, variables, overwrite=True)
  if os.path.exists(path + ".partial"):
    os.remove(path + ".partial")
  return variables


PRETRAIN_INFO = "pretrain.json"


def pretrain_info(workdir: str) -> dict:
  """What `pretrain_stage` recorded about the backbone ({} for a workdir from before it did)."""
  path = os.path.join(workdir, PRETRAIN_INFO)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def fresh_head(trainable: PyTree, model, image_shape, seed: int) -> PyTree:
  """The pre-trained trainable collection with a freshly initialised head (one per task)."""
  if "head" not in trainable:
    raise ValueError(f"the trainable collection has no 'head' (keys: {sorted(trainable)})")
  init = _init_variables(model, image_shape, seed)
  return {**trainable, "head": init["trainable"]["head"]}


def _stage(path: str, target: PyTree, compute: Callable[[], PyTree]) -> PyTree:
  """Restores `path` if a complete checkpoint is there, else computes and saves it."""
  if os.path.isdir(path):
    return checkpoints.restore_checkpoint(path, target)
  value = jax.tree_util.tree_map(np.asarray, compute())
  checkpoints.save_checkpoint(path, value, overwrite=True)
  # The stage is complete: its periodic checkpoints are no longer needed.
  for leftover in [path + ".partial"] + glob.glob(glob.escape(path) + "_gram_*.state"):
    if os.path.exists(leftover):
      os.remove(leftover)
  return value


def _json_stage(path: str, compute: Callable[[], dict]) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = compute()
  wd.atomic_write_json(path, value)
  return value


def evaluate_method(model, trainable, frozen, data, cfg, seed: int, name: str,
                    progress: _Progress, mesh=None) -> dict:
  """Accuracies on every split and the relearn time of one method's params."""
  predict = lambda split: train_lib.predict(model, trainable, frozen, split.x,
                                            batch_size=cfg.eval.batch_size)
  logits = {name: predict(getattr(data, name))
            for name in ("retain", "forget", "test_retain", "test_forget")}
  metrics = {f"acc_{name}": train_lib.accuracy(z, getattr(data, name).y)
             for name, z in logits.items()}
  # The unlearning field's metrics (SalUn / Unlearn-Sparse): UA, RA, TA (test without the
  # forgotten classes) and MIA-Efficacy (hold-out of the retained classes as non-members).
  metrics.update(ua=100.0 - metrics["acc_forget"], ra=metrics["acc_retain"],
                 ta=metrics["acc_test_retain"])
  metrics["mia_efficacy"] = (mia.mia_efficacy(
      logits["retain"], data.retain.y, logits["test_retain"], data.test_retain.y,
      logits["forget"], data.forget.y, seed=seed) if data.test_retain.size else None)
  spec = train_spec(cfg.eval.relearn)
  _, _, history = train_lib.fit(
      model, trainable, frozen, data.forget, spec, data.num_classes, seed=seed + 7,
      stop_below=cfg.eval.relearn_threshold,
      progress=progress.epochs(f"seed{seed}/relearn/{name}", spec.epochs), mesh=mesh)
  reached = history[-1] < cfg.eval.relearn_threshold
  metrics["relearn_epochs"] = len(history) if reached else spec.epochs
  metrics["relearn_curve"] = history
  metrics["relearn_protocol"] = (f"{spec.describe()}, until D_f loss < "
                                 f"{cfg.eval.relearn_threshold:g}, cap {spec.epochs}")
  return metrics


def linear_probe(model, trainable, frozen, data, cfg, seed: int, tag: str,
                 progress: _Progress, mesh=None) -> dict:
  """Probe: freeze everything but a fresh head, train it on D, report D_r / D_f accuracy.

  High probe accuracy on D_f means the features still separate the forgotten data.
  """
  spec = train_spec(cfg.eval.probe, head_only=True)
  start = fresh_head(trainable, model, data.image_shape, seed + 31)
  probed, _, _ = train_lib.fit(model, start, frozen, data.train, spec, data.num_classes,
                               seed=seed + 3,
                               progress=progress.epochs(f"seed{seed}/probe/{tag}", spec.epochs),
                               mesh=mesh)
  acc = lambda split: train_lib.accuracy(
      train_lib.predict(model, probed, frozen, split.x, batch_size=cfg.eval.batch_size), split.y)
  return {"probe_acc_retain": acc(data.retain), "probe_acc_forget": acc(data.forget)}


def _solve_dtype(cfg):
  return jnp.float64 if cfg.unlearn.solve_dtype == "float64" else jnp.float32


def reuses_finetuning_grams(cfg) -> bool:
  """Whether Fast-NTK takes its Gram statistics from the fine-tuning of the same seed: Full and
  Retrain linearised at w0 in closed form were solved from exactly the statistics the primal
  update needs, so the update reuses them (and counts their time as its own)."""
  return (cfg.finetune.mode == "linearized" and cfg.finetune.linearized_solver == "closed_form"
          and cfg.unlearn.linearize_at == "init")


def as_reference_model(plan):
  """The plan of an update whose reference is the linearised model that its own Gram
  statistics define (Full and Retrain solved from the same ones): the round-off of the
  network's narrower logits then shapes that model alike for every method and is no error of
  the update; only the solve's precision is (the precision warning and refusal say so)."""
  return dataclasses.replace(
      plan, logits_dtype=None,
      reason=plan.reason + "; Gram statistics shared with the linearised Full/Retrain")


def fastntk_stage(cfg, model, frozen_pre, w0, w_full, data, sdir: str, tag: str, mesh=None,
                  grams: Optional[dict] = None):
  """The Fast-NTK update of one seed; returns (new trainable params, diagnostics dict).

  The kernel is taken at w0 with the *pre-trained* BN statistics (docs/derivation.md §1).
  When the solver is (or `auto` picks) primal, the Gram statistics are summed in chunks of
  `unlearn.checkpoint_rows` samples (`unlearn.accumulate_chunks`), each saved atomically, so a
  preempted run resumes mid-accumulation; with a mesh each chunk's rows are split over the
  devices (`sharding.data_parallel_sum`). The other solvers run in one piece.

  Args:
    grams: with `reuses_finetuning_grams(cfg)`, a callable giving the fine-tuning's
      statistics at w0 as (((G, b), seconds) of "retain", the same of "forget", seconds spent
      compiling them); the primal solver uses them (their seconds count in the update's time,
      their compilation is reported apart) instead of recomputing them.
  """
  u = cfg.unlearn
  apply_fn = tr.make_apply_fn(model, frozen_pre)
  retain = (jnp.asarray(data.retain.x), jnp.asarray(data.retain.y))
  forget = (jnp.asarray(data.forget.x), jnp.asarray(data.forget.y))
  options = dict(num_classes=data.num_classes, damping=float(u.damping), solver=u.solver,
                 batch_size=u.batch_size, kernel_impl=u.kernel_impl,
                 solve_dtype=jnp.float64 if u.solve_dtype == "float64" else None,
                 linearize_at=u.linearize_at, step_scale=float(u.step_scale))
  if u.serve:
    forgetter = unlearn.make_forgetter(
        apply_fn, **options, max_cache_bytes=int(u.jacobian_cache_gib * 2**30))
    return served_update(cfg, forgetter, apply_fn, w0, w_full, data, sdir, tag)
  auto_to_primal = grams is not None and unlearn.Solver(u.solver) == unlearn.Solver.AUTO
  if auto_to_primal:
    # Full/Retrain already paid for the primal Gram statistics: reusing them costs only the
    # p×p solve, whatever another solver would cost from scratch, and keeps the update on the
    # very model they define (a recomputation through narrower logits would drift from it).
    options["solver"] = unlearn.Solver.PRIMAL
  forgetter = unlearn.make_forgetter(apply_fn, **options)
  plan = forgetter.plan(w0, w_full, retain, forget, traced=True)
  if auto_to_primal:
    plan = dataclasses.replace(plan, reason="auto: primal, the solver whose Gram statistics "
                               "the linearised Full/Retrain computed")
  if plan.solver != unlearn.Solver.PRIMAL:
    new, diag = unlearn.ntk_forget_with_diagnostics(apply_fn, w0, w_full, retain=retain,
                                                    forget=forget, **options)
    return new, diag.as_dict()

  if grams is not None:
    plan = as_reference_model(plan)
    start = time.perf_counter()
    (retain_stats, retain_s), (forget_stats, forget_s), compile_seconds = grams()
    try:
      new, info = forgetter.from_gram_stats(w_full, retain_stats, forget_stats, plan)
    except unlearn.SolveError as e:
      raise unlearn.SolveError(f"{tag}: {e} (config: unlearn.damping)") from e
    new = jax.block_until_ready(new)
    seconds = time.perf_counter() - start + retain_s + forget_s
    norm = float(np.linalg.norm(np.asarray(ravel_pytree(new)[0], np.float64)
                                - np.asarray(ravel_pytree(w_full)[0], np.float64)))
    return new, unlearn.make_diagnostics(plan, info, update_norm=norm, seconds=seconds,
                                         compile_seconds=compile_seconds).as_dict()

  w_lin = w0 if u.linearize_at == "init" else w_full
  stats_fn = lambda w, x, y, weights: unlearn.gram_stats(
      apply_fn, w, x, y, num_classes=data.num_classes, batch_size=u.batch_size,
      dtype=plan.solve_dtype, row_weights=weights)
  rows, p = u.checkpoint_rows, plan.num_params
  compile_start = time.perf_counter()
  if mesh is None:
    # Compiled before the clock starts (every chunk has this shape), so that the reported
    # time of the update excludes XLA compilation, as in ntk_forget_with_diagnostics.
    example = (np.zeros((rows,) + data.retain.x.shape[1:], data.retain.x.dtype),
               np.zeros(rows, np.int32), np.zeros(rows, np.float32))
    chunk_stats = jax.jit(stats_fn).lower(w_lin, *example).compile()
  else:  # each chunk's rows split over the devices, one all-reduce per statistic
    chunk_stats = sharding.data_parallel_sum(stats_fn, mesh, block_size=u.batch_size)
  compile_seconds = time.perf_counter() - compile_start
  start = time.perf_counter()
  stats = {}
  # Each chunk's checkpoint (p×p) is written while the next chunk computes.
  with wd.BackgroundSaver() as saver:
    for part, split in (("retain", data.retain), ("forget", data.forget)):
      path = os.path.join(sdir, f"fastntk_gram_{part}.state")
      empty = {"g": np.zeros((p, p), plan.solve_dtype), "b": np.zeros((p,), plan.solve_dtype),
               "next": 0}

      def save(state, path=path, part=part):
        point = f"{tag}:gram_{part}_chunk{state['next'] // rows - 1}"
        saver.submit(path, state, then=lambda: faults.maybe_kill(point))

      state = unlearn.accumulate_chunks(
          lambda x, y, weights: chunk_stats(w_lin, x, y, weights), split.x, split.y,
          chunk_rows=rows, state=wd.load_state(path, empty) or empty, on_chunk=save)
      stats[part] = (state["g"], state["b"])
  try:
    new, info = forgetter.from_gram_stats(w_full, stats["retain"], stats["forget"], plan)
  except unlearn.SolveError as e:
    raise unlearn.SolveError(f"{tag}: {e} (config: unlearn.damping, unlearn.solve_dtype)") from e
  seconds = time.perf_counter() - start
  norm = float(np.linalg.norm(np.asarray(ravel_pytree(new)[0], np.float64)
                              - np.asarray(ravel_pytree(w_full)[0], np.float64)))
  diag = unlearn.make_diagnostics(plan, info, update_norm=norm, seconds=seconds,
                                  compile_seconds=compile_seconds,
                                  reason_suffix="; chunked Gram accumulation, resumable")
  return new, {**diag.as_dict(), "checkpoint_wait_seconds": saver.wait_seconds}


STATE_OF_D = "fastntk_state_of_D.state"


def _stale_state_of_d(stored, cfg, w0, x) -> Optional[str]:
  """Why a state of D read back from the workdir cannot serve this run (None: it can).

  `wd.claim` already refuses a workdir of another config; this also refuses a state that
  reached the seed dir otherwise (copied in, or written by another version): one built at
  another w0, with another damping or solve dtype, on other inputs, or that has already
  served requests. Its arrays are compared as stored, before `jnp.asarray` could narrow a
  float64 state to float32 silently.
  """
  if not isinstance(stored, dict):
    return f"holds a {type(stored).__name__}, not a state of D"
  if "w_lin" not in stored or not np.array_equal(
      np.asarray(ravel_pytree(stored["w_lin"])[0]), np.asarray(ravel_pytree(w0)[0])):
    return "was built at another w0"
  u = cfg.unlearn
  dtype = (np.dtype(np.float64) if u.solve_dtype == "float64"
           else np.dtype(unlearn.validate.default_solve_dtype(w0)))
  for name in ("gram", "rhs", "chol", "solution", "residuals", "damping"):
    got = np.asarray(stored[name]).dtype
    if got != dtype:
      return f"was solved in {got.name} ({name}), this run in {dtype.name}"
  if float(np.asarray(stored["damping"])) != float(np.asarray(u.damping, dtype)):
    return f"was built with damping {float(np.asarray(stored['damping']))}, not {u.damping}"
  if not np.array_equal(np.asarray(stored["x"]), np.asarray(x)):
    return "was built on other inputs than this run's D"
  if int(np.asarray(stored["num_requests"])) or np.asarray(stored["forgotten"]).any():
    return "has already served requests"
  return None


def served_update(cfg, forgetter, apply_fn, w0, w_full, data, sdir: str, tag: str):
  """Fast-NTK as a deletion request on the state of D (`unlearn.stream`): the Gram,
  Cholesky factor and ridge solution at w0 over all of D, built once and kept in
  `sdir/fastntk_state_of_D.state`, then D_f (the last rows of D) forgotten as one request.
  The parameters equal the one-shot update's up to round-off.

  Returns:
    (new trainable params, diagnostics dict) whose "seconds" is the request's latency,
    "cold_seconds" what building the state took, its compilation included, and
    "cold_compile_seconds" that compilation (both None when the state was read back from
    the workdir); the request's compilation is reported apart in "compile_seconds".
  """
  u, train = cfg.unlearn, data.train
  path = os.path.join(sdir, STATE_OF_D)
  restore = lambda arrays: unlearn.stream.state_from_arrays(
      {**arrays, "w_lin": w0}, apply_fn=apply_fn, num_classes=data.num_classes,
      batch_size=u.batch_size)
  x, y = jnp.asarray(train.x), jnp.asarray(train.y)
  stored = wd.load_state(path, None)
  cold_seconds, state = None, None
  if stored is not None:
    try:
      why = _stale_state_of_d(stored, cfg, w0, x)
      if why is None:
        state = restore({k: v for k, v in stored.items() if k != "w_lin"})
      else:
        log.warning("%s: %s %s; building it again", tag, path, why)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      log.warning("%s: discarding %s (%s); building it again", tag, path, e)
  compile_seconds, cold_compile_seconds = 0.0, None
  if state is None:
    timings = {}
    state = jax.block_until_ready(forgetter.init(w0, (x, y), timings=timings))
    cold_seconds, cold_compile_seconds = timings["seconds"], timings["compile_seconds"]
    wd.save_state(path, unlearn.stream.state_arrays(state))
    faults.maybe_kill(f"{tag}:state_of_D_saved")
  forget_indices = np.arange(data.retain.size, train.size)
  # The request's computation compiles on its first call: served once untimed on the same
  # shapes (the state is immutable, so this changes nothing), then timed.
  start = time.perf_counter()
  jax.block_until_ready(forgetter.serve(state, w_full, forget_indices))
  compile_seconds += time.perf_counter() - start
  start = time.perf_counter()
  new, after = jax.block_until_ready(forgetter.serve(state, w_full, forget_indices))
  seconds = time.perf_counter() - start
  compile_seconds -= seconds  # the untimed call also did the request's work once
  norm = float(np.linalg.norm(np.asarray(ravel_pytree(new)[0], np.float64)
                              - np.asarray(ravel_pytree(w_full)[0], np.float64)))
  n, c, p = train.size, data.num_classes, int(ravel_pytree(w0)[0].size)
  # The stream's estimate (gram_scale / min pivot², a lower bound) can be far below κ (29x on
  # `:tiny,standard`), so the precision warning would go missing where the one-shot update
  # gives it: κ itself, outside the timing, of both matrices the result was solved with, as
  # the one-shot primal does (G + λI of D for the state's solution, G_r + λI for the request's;
  # G_r's alone was 28% below the one-shot's κ on `:tiny`).
  def kappa(gram):
    eig = np.linalg.eigvalsh(np.asarray(gram, np.float64) + float(after.damping) * np.eye(p))
    return float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
  cond = max(kappa(after.gram), kappa(state.gram))
  log.info("%s: state of D %s; request of %d samples served in %.3f s", tag,
           "read back from the workdir" if cold_seconds is None else
           f"built in {cold_seconds:.2f} s", forget_indices.size, seconds)
  return new, {
      "solver": "primal", "reason": "served as a request on the state of D (unlearn.serve)",
      "kernel": None, "num_params": p, "num_outputs": n * c,
      "condition_number": cond,
      "condition_estimate": float(after.last_condition_estimate),  # the stream's lower bound
      "cg_relative_residual": None, "converged": True, "seconds": seconds,
      "request_seconds": seconds, "cold_seconds": cold_seconds,
      "cold_compile_seconds": cold_compile_seconds, "jacobian_cache": state.jac is not None,
      "compile_seconds": max(compile_seconds, 0.0), "update_norm": norm,
      "factor_update": ("none", "downdate", "refactor", "refactor after a failed downdate")[
          int(after.last_update)],
      # Recomputed request rows carry the network's round-off into G - J_fᵀJ_f (stream).
      "precision_warning": unlearn.precision_warning(
          cond, after.rhs.dtype,
          logits_dtype=None if state.jac is not None else ravel_pytree(w0)[0].dtype)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def distances_to_retrain(model, methods: dict, data, cfg, w0) -> dict:
  """Per method: ||w - w_retrain||₂ over the trainable collection (also relative to
  ||w_retrain - w0||, the size of what fine-tuning on D_r learned), and the mean
  KL(Retrain ‖ method) of the predicted class distributions on D_f and on the hold-out.

  Also the membership-inference attack of `fastntk_jax.mia` (logistic regression on
  per-example cross-entropy, D_f = members vs hold-out of the same classes = non-members,
  5-fold CV): attack accuracy and AUC, to be read against Retrain's (the reference).

  Returns:
    {method: {"l2_to_retrain", "relative_l2_to_retrain", "kl_to_retrain_forget",
              "kl_to_retrain_test", "mia_accuracy", "mia_auc"}}.
  """
  # The loss attack's non-members: in class forgetting, the forgotten classes' hold-out (the
  # same classes as D_f, never trained on), else the whole hold-out; another class's hold-out
  # would let the attack tell classes apart, not members (95% for Retrain too).
  holdout = (data.test_forget if data.forget_mode == "class" and data.test_forget.size >= 2
             else data.test)  # the attack's cross-validation needs 2 of each
  def logp(params, frozen, x):
    if len(x) == 0:
      return None
    return _log_softmax(train_lib.predict(model, params, frozen, x,
                                          batch_size=cfg.eval.batch_size).astype(np.float64))
  ref_params, ref_frozen = methods["retrain"]
  ref_flat = np.asarray(ravel_pytree(ref_params)[0], np.float64)
  learned = np.linalg.norm(ref_flat - np.asarray(ravel_pytree(w0)[0], np.float64))
  ref = {"forget": logp(ref_params, ref_frozen, data.forget.x),
         "test": logp(ref_params, ref_frozen, holdout.x)}
  out = {}
  for name, (params, frozen) in methods.items():
    l2 = float(np.linalg.norm(np.asarray(ravel_pytree(params)[0], np.float64) - ref_flat))
    entry = {"l2_to_retrain": l2, "relative_l2_to_retrain": l2 / max(learned, 1e-300)}
    mine = {}
    for split, x in (("forget", data.forget.x), ("test", holdout.x)):
      mine[split] = logp(params, frozen, x)
      entry[f"kl_to_retrain_{split}"] = (None if mine[split] is None else float(np.mean(
          np.sum(np.exp(ref[split]) * (ref[split] - mine[split]), axis=-1))))
    # The attack's cross-validation needs 2 samples on each side (a tiny D_f may have 1).
    entry["mia_accuracy"] = entry["mia_auc"] = None
    if mine["forget"] is not None and mine["test"] is not None and min(
        data.forget.size, holdout.size) >= 2:
      attack = mia.mia_from_logits(mine["forget"], data.forget.y, mine["test"], holdout.y,
                                   num_folds=min(5, data.forget.size, holdout.size), seed=0)
      entry["mia_accuracy"] = 100.0 * attack.accuracy
      entry["mia_auc"] = attack.auc
    out[name] = entry
  return out


class CompiledOnce:
  """`fn` jitted and compiled ahead of time once per argument signature (shapes, dtypes,
  structure), so that a caller can time the computation apart from XLA's compilation:
  `compile_seconds` holds what the last call spent compiling (0.0 when it reused one)."""

  def __init__(self, fn: Callable):
    self._jitted = jax.jit(fn)
    self._executables = {}
    self.compile_seconds = 0.0

  def __call__(self, *args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
    self.compile_seconds = 0.0
    if key not in self._executables:
      start = time.perf_counter()
      self._executables[key] = self._jitted.lower(*args).compile()
      self.compile_seconds = time.perf_counter() - start
    return self._executables[key](*args)


def gram_stats_fn(cfg, model, frozen_pre, num_classes: int) -> CompiledOnce:
  """`unlearn.gram_stats` at a given w0 over (x, y), compiled once per data shape and shared
  by all the seeds that call it."""
  apply_fn = tr.make_apply_fn(model, frozen_pre)
  return CompiledOnce(lambda w0, x, y: unlearn.gram_stats(
      apply_fn, w0, x, y, num_classes=num_classes, batch_size=cfg.unlearn.batch_size,
      dtype=_solve_dtype(cfg)))


class FineTuner:
  """Full and Retrain of one seed from w0: the network by SGD, or (finetune.mode=
  "linearized") the network linearised at w0 in closed form or by the same optax loop.

  Attributes:
    linearized: whether every method is f_lin (docs/derivation.md §5).
    net: what methods are trained and evaluated as: the model, or `unlearn.Linearized`.
    frozen_net: its frozen collections (with w0 under LINEARIZATION_POINT when linearised).
  """

  def __init__(self, cfg, model, frozen_pre, w0, data, seed, progress, mesh=None,
               gram_fn=None):
    self.cfg, self.model, self.frozen_pre, self.w0, self.data = cfg, model, frozen_pre, w0, data
    self.seed, self.progress, self.mesh = seed, progress, mesh
    # `(w0, x, y) -> (G, b)`, jitted once and shared by every seed (`gram_stats_fn`).
    self.gram_fn = gram_fn or gram_stats_fn(cfg, model, frozen_pre, data.num_classes)
    self.linearized = cfg.finetune.mode == "linearized"
    self.net = linear.Linearized(model) if self.linearized else model
    self.frozen_net = ({**frozen_pre, tr.LINEARIZATION_POINT: w0} if self.linearized
                       else frozen_pre)
    self._grams = {}
    self.compile_seconds = 0.0  # spent compiling the Gram statistics' computation

  def gram(self, split, tag):
    """Gram statistics of a split at w0 and the seconds they took, compilation excluded
    (computed once; what compiling took is added to `compile_seconds`)."""
    if tag not in self._grams:
      start = time.perf_counter()
      g = jax.block_until_ready(self.gram_fn(self.w0, jnp.asarray(split.x),
                                             jnp.asarray(split.y)))
      compiled = self.gram_fn.compile_seconds
      self.compile_seconds += compiled
      self._grams[tag] = (g, time.perf_counter() - start - compiled)
    return self._grams[tag]

  def fit(self, split, tag: str, checkpoint_path: Optional[str] = None) -> tuple[dict, float]:
    """Fine-tunes on `split` ("full": D, "retrain": D_r); returns ({"trainable"[,
    "batch_stats"]}, seconds)."""
    cfg, data = self.cfg, self.data
    start = time.perf_counter()
    if self.linearized and cfg.finetune.linearized_solver == "closed_form":
      parts = [self.gram(data.retain, "retain")] + (
          [self.gram(data.forget, "forget")] if tag == "full" else [])
      solve_start = time.perf_counter()
      params = linear.ridge_solution(self.w0, [g for g, _ in parts],
                                     jnp.asarray(cfg.unlearn.damping, _solve_dtype(cfg)))
      return {"trainable": params}, sum(t for _, t in parts) + time.perf_counter() - solve_start
    spec = train_spec(cfg.finetune)
    if self.linearized:  # mean squared loss over the split: the ridge penalty λ/n
      spec = dataclasses.replace(spec, loss="mse", bn_mode="frozen",
                                 l2_to_init=float(cfg.unlearn.damping) / len(split[1]))
    name = f"seed{self.seed}/{tag}"
    params, stats, _ = train_lib.fit(self.net, self.w0, self.frozen_net, split, spec,
                                     data.num_classes, seed=self.seed,
                                     progress=self.progress.epochs(name, spec.epochs),
                                     checkpoint_path=checkpoint_path, tag=name, mesh=self.mesh)
    out = {"trainable": params}
    if stats is not None and not self.linearized:
      out["batch_stats"] = stats
    return out, time.perf_counter() - start


BASELINES = ("max_loss", "random_label")


def baseline_fit(cfg, net, name: str, full_params, frozen_full: dict, data, seed: int,
                 progress: _Progress, *, checkpoint_path: Optional[str] = None, mesh=None):
  """A baseline unlearning method from Full's trainable params; returns the new ones.

  "max_loss": gradient ascent on D_f (`baselines.max_loss`); "random_label": fine-tuning on
  D_f with seeded random wrong labels (`baselines.random_label`). `net` is what the methods
  are trained as (the model, or its linearisation).
  """
  c = data.num_classes
  if name == "max_loss":
    split, spec, offset = data.forget, train_spec(cfg.baselines.max_loss, ascent=True), 1
  elif name == "random_label":
    rng = np.random.default_rng([seed, 17])
    wrong = (data.forget.y + rng.integers(1, c, size=data.forget.size)) % c  # never the true one
    split, spec, offset = (data.forget.x, wrong), train_spec(cfg.baselines.random_label), 2
  else:
    raise ValueError(f"unknown baseline {name!r}; one of {BASELINES}")
  params, _, _ = train_lib.fit(net, full_params, frozen_full, split, spec, c, seed=seed + offset,
                               progress=progress.epochs(f"seed{seed}/{name}", spec.epochs),
                               checkpoint_path=checkpoint_path, tag=f"seed{seed}/{name}",
                               mesh=mesh)
  return params


# Conjugate-gradient steps making the certificate's witness (`unlearn.certify`): on the
# digits default 20 steps took the bound from 1.4e-2 to 7.9e-4 of ‖w_r − w0‖ (the gradient
# bound alone is loose by up to κ); each is one jvp and one vjp over D_r.
CERTIFICATE_CG_STEPS = 30


def ridge_witness_solver(gram, damping: float) -> Callable[[np.ndarray], np.ndarray]:
  """`g [p] -> (gram + damping·I)⁻¹ g` in float64 whatever JAX's 64-bit mode (factorised once,
  by `unlearn.solvers.cholesky`): a float32 witness loosened the certificate's bound up to 2x
  (still valid: `certify` recomputes it from the witness's residual)."""
  with _x64_if(True):
    g = jnp.asarray(np.asarray(gram, np.float64))
    solve, _ = unlearn.solvers.cholesky_solver(g + damping * jnp.eye(g.shape[0], dtype=g.dtype))

  def witness_solver(rhs):
    with _x64_if(True):
      return np.asarray(solve(jnp.asarray(np.asarray(rhs, np.float64))), np.float64)
  return witness_solver


def certify_deletion(cfg, model, frozen_pre, w0, params, data, workdir: str, *,
                     request_id: str, solver: str, linearized: bool,
                     retain_gram=None) -> dict:
  """The certificate of a deletion (`unlearn.certify`) and its record in the workdir's
  audit log (`fastntk_jax.audit`); returns the diagnostics entries to add.

  `retain_gram`: G_r = J_rᵀJ_r at w0 when the run holds it (linearised closed form); the
  witness is then one Cholesky solve with it instead of conjugate-gradient steps.
  """
  start = time.perf_counter()
  witness_solver = None
  if retain_gram is not None:
    witness_solver = ridge_witness_solver(retain_gram, float(cfg.unlearn.damping))
  apply_fn = tr.make_apply_fn(model, frozen_pre)
  retain, forget = (data.retain.x, data.retain.y), (data.forget.x, data.forget.y)
  u = cfg.unlearn
  cert = unlearn.certify(apply_fn, w0, params, retain, num_classes=data.num_classes,
                         damping=float(u.damping), batch_size=u.batch_size,
                         linearized=linearized,
                         dtype=jnp.float64 if u.solve_dtype == "float64" else None,
                         witness_iterations=CERTIFICATE_CG_STEPS,
                         witness_solver=witness_solver)
  seconds = time.perf_counter() - start
  log.info("%s: certificate: %s", request_id, cert.statement)
  record = audit.record_deletion(
      workdir, request_id=request_id,
      model={"name": cfg.model.name, "num_classes": int(data.num_classes),
             "options": wd.config_dict(cfg)["model"]["options"]},
      frozen=frozen_pre, params_init=w0, params=params, retain=retain, forget=forget,
      # D is D_r followed by D_f (`data.train`): the forgotten ids are D_f's rows of D.
      forget_ids=np.arange(data.retain.size, data.retain.size + data.forget.size),
      damping=float(u.damping), solver=solver, certificate=cert, batch_size=u.batch_size)
  return {"certificate": cert.as_dict(), "certificate_seconds": seconds,
          "audit_record": record["index"]}


def run_seed(cfg, model, data, pretrained: dict, seed: int, workdir: str,
             progress: _Progress, mesh=None, gram_fn=None) -> dict:
  """All methods for one seed; returns {method: metrics} and {probe kind: metrics}.
  `gram_fn` (`gram_stats_fn`), when given, is shared with the other seeds (compiled once)."""
  sdir = os.path.join(workdir, f"seed_{seed}")
  os.makedirs(sdir, exist_ok=True)
  w_pre, frozen_pre = tr.split(pretrained)
  w0 = fresh_head(w_pre, model, data.image_shape, seed)
  c = data.num_classes
  results, timings = {}, {}
  tuner = FineTuner(cfg, model, frozen_pre, w0, data, seed, progress, mesh, gram_fn=gram_fn)
  linearized, net, frozen_net = tuner.linearized, tuner.net, tuner.frozen_net

  def finetune(split, tag):
    out, timings[tag] = tuner.fit(split, tag, checkpoint_path=os.path.join(sdir, f"{tag}.partial"))
    return out

  target = {"trainable": w0}
  if "batch_stats" in frozen_pre and not linearized:
    target["batch_stats"] = frozen_pre["batch_stats"]
  full = _stage(os.path.join(sdir, "full"), target, lambda: finetune(data.train, "full"))
  retrain = _stage(os.path.join(sdir, "retrain"), target, lambda: finetune(data.retain, "retrain"))
  # The fine-tuned model's frozen side: its BN statistics (updated only if bn_mode="train").
  frozen_full = {**frozen_net, **({"batch_stats": full["batch_stats"]} if "batch_stats" in full else {})}
  frozen_retrain = {**frozen_net, **({"batch_stats": retrain["batch_stats"]} if "batch_stats" in retrain else {})}

  methods = {"full": (full["trainable"], frozen_full), "retrain": (retrain["trainable"], frozen_retrain)}
  diagnostics = {}

  if "fastntk" in cfg.methods:
    def fastntk():
      grams = None
      if reuses_finetuning_grams(cfg):
        grams = lambda: (tuner.gram(data.retain, "retain"), tuner.gram(data.forget, "forget"),
                         tuner.compile_seconds)
      new, diag = fastntk_stage(cfg, model, frozen_pre, w0, full["trainable"], data, sdir,
                                tag=f"seed{seed}/fastntk", mesh=mesh, grams=grams)
      timings["fastntk"] = diag["seconds"]
      diag.update(certify_deletion(
          cfg, model, frozen_pre, w0, new, data, workdir, request_id=f"seed{seed}/fastntk",
          solver=diag["solver"], linearized=linearized,
          retain_gram=tuner.gram(data.retain, "retain")[0][0] if grams is not None else None))
      wd.atomic_write_json(os.path.join(sdir, "fastntk_diagnostics.json"), diag)
      return {"trainable": new}
    out = _stage(os.path.join(sdir, "fastntk"), {"trainable": w0}, fastntk)
    methods["fastntk"] = (out["trainable"], frozen_full)
    with open(os.path.join(sdir, "fastntk_diagnostics.json")) as f:
      diagnostics = json.load(f)

  for name in BASELINES:
    if name not in cfg.methods:
      continue
    def compute(name=name):
      start = time.perf_counter()
      p = baseline_fit(cfg, net, name, full["trainable"], frozen_full, data, seed, progress,
                       checkpoint_path=os.path.join(sdir, f"{name}.partial"), mesh=mesh)
      timings[name] = time.perf_counter() - start
      return {"trainable": p}
    out = _stage(os.path.join(sdir, name), {"trainable": w0}, compute)
    methods[name] = (out["trainable"], frozen_full)

  for name, (params, frozen) in methods.items():
    def compute(name=name, params=params, frozen=frozen):
      m = evaluate_method(net, params, frozen, data, cfg, seed, name, progress, mesh)
      m["seconds"] = timings.get(name)  # None when this run restored the stage from disk
      return m
    results[name] = _json_stage(os.path.join(sdir, f"{name}.json"), compute)
    faults.maybe_kill(f"seed{seed}/eval:{name}")
  if diagnostics:
    results["fastntk"]["diagnostics"] = diagnostics

  # Distance of every method to Retrain (the golden baseline): parameters and predictions.
  extra = _json_stage(os.path.join(sdir, "vs_retrain.json"),
                      lambda: distances_to_retrain(net, methods, data, cfg, w0))
  for name, values in extra.items():
    results[name] = {**results[name], **values}

  probes = {}
  random_init = _init_variables(model, data.image_shape, seed=20_000 + seed)
  w_rand, frozen_rand = tr.split(random_init)
  probe_inputs = {"pretrained": (w0, frozen_pre), "random_init": (w_rand, frozen_rand)}
  if "fastntk" in methods:  # the backbone as Fast-NTK left it (BN parameters), not f_lin
    probe_inputs["fastntk"] = (methods["fastntk"][0],
                               {k: v for k, v in methods["fastntk"][1].items()
                                if k != tr.LINEARIZATION_POINT})
  for kind, (params, frozen) in probe_inputs.items():
    probes[kind] = _json_stage(
        os.path.join(sdir, f"probe_{kind}.json"),
        lambda params=params, frozen=frozen, kind=kind: linear_probe(
            model, params, frozen, data, cfg, seed, kind, progress, mesh))
  return {"methods": results, "probes": probes}


POPULATION_SEED_BASE = 100_000  # population seeds never coincide with the report's seeds


def population_stage(cfg, model, data, pretrained: dict, workdir: str, progress: _Progress,
                     mesh=None) -> Optional[dict]:
  """KLoM (`fastntk_jax.klom`) over `eval.population_seeds` = N seeds.

  Seeds A (N of them) give Full, Retrain, Fast-NTK and the baselines of `cfg.methods`
  (Max Loss, Random Label, from each seed's Full); seeds B (N others) give Retrain
  models only. Per forget example, KLoM compares the margin distribution of a method over A
  with Retrain's over B; Retrain over A against B is the noise floor. Each seed's margins are
  a resumable stage of their own (`population/seed_<k>.json`).

  Returns:
    {"num_seeds", "per_method": {method: klom.summary}, "floor": "retrain"} or None when off.
  """
  n = int(cfg.eval.population_seeds)
  if n == 0 or "fastntk" not in cfg.methods:
    return None
  pdir = os.path.join(workdir, "population")
  os.makedirs(pdir, exist_ok=True)
  w_pre, frozen_pre = tr.split(pretrained)
  u = cfg.unlearn
  forgetter = unlearn.make_forgetter(
      tr.make_apply_fn(model, frozen_pre), num_classes=data.num_classes,
      damping=float(u.damping), solver=u.solver, batch_size=u.batch_size,
      kernel_impl=u.kernel_impl, solve_dtype=jnp.float64 if u.solve_dtype == "float64" else None,
      linearize_at=u.linearize_at, step_scale=float(u.step_scale))
  retain = (jnp.asarray(data.retain.x), jnp.asarray(data.retain.y))
  forget = (jnp.asarray(data.forget.x), jnp.asarray(data.forget.y))
  # Linearised at w0 in closed form, the Gram statistics Full and Retrain were solved from
  # are those the primal update needs: the update reuses them (the pipeline's primal path).
  reuse = reuses_finetuning_grams(cfg)
  plan = forgetter.plan(fresh_head(w_pre, model, data.image_shape, POPULATION_SEED_BASE),
                        fresh_head(w_pre, model, data.image_shape, POPULATION_SEED_BASE),
                        retain, forget) if reuse else None

  gram_fn = gram_stats_fn(cfg, model, frozen_pre, data.num_classes)

  def one(k: int) -> dict:
    seed = POPULATION_SEED_BASE + k
    log.info("population: seed %d of %d", k + 1, 2 * n)
    w0 = fresh_head(w_pre, model, data.image_shape, seed)
    tuner = FineTuner(cfg, model, frozen_pre, w0, data, seed, progress, mesh, gram_fn=gram_fn)
    frozen_of = lambda out: {**tuner.frozen_net, **({"batch_stats": out["batch_stats"]}
                                                      if "batch_stats" in out else {})}
    margin = lambda params, frozen: klom.margins(train_lib.predict(
        tuner.net, params, frozen, data.forget.x, batch_size=cfg.eval.batch_size),
                                                 data.forget.y).tolist()
    retrain, _ = tuner.fit(data.retain, "retrain")
    out = {"retrain": margin(retrain["trainable"], frozen_of(retrain))}
    if k < n:
      full, _ = tuner.fit(data.train, "full")
      if reuse:
        new, _ = forgetter.from_gram_stats(
            full["trainable"], tuner.gram(data.retain, "retain")[0],
            tuner.gram(data.forget, "forget")[0],
            as_reference_model(dataclasses.replace(plan, solver=unlearn.Solver.PRIMAL)))
      else:
        new = forgetter.forget(w0, full["trainable"], retain, forget)
      out["full"] = margin(full["trainable"], frozen_of(full))
      out["fastntk"] = margin(new, frozen_of(full))
      for name in BASELINES:
        if name in cfg.methods:
          out[name] = margin(baseline_fit(cfg, tuner.net, name, full["trainable"],
                                          frozen_of(full), data, seed, progress, mesh=mesh),
                             frozen_of(full))
    return out

  per = [_json_stage(os.path.join(pdir, f"seed_{k}.json"), lambda k=k: one(k))
         for k in range(2 * n)]
  reference = np.asarray([p["retrain"] for p in per[n:]])
  return {"num_seeds": n, "floor": "retrain",
          "per_method": {m: klom.summary(klom.klom(np.asarray([p[m] for p in per[:n]]),
                                                   reference))
                         for m in ("fastntk", *BASELINES, "full", "retrain")
                         if all(m in p for p in per[:n])}}


_TRAIN_GROUPS = ("pretrain.train", "finetune", "baselines.max_loss", "baselines.random_label",
                 "eval.relearn", "eval.probe")


def data_mesh(cfg) -> Optional[Any]:
  """All devices (of all processes) on one "data" axis, or None with a single device.

  Every training batch is split evenly over the devices (no padding: padded rows would
  change BatchNorm's batch statistics), so each batch size must be a multiple of the
  device count; a config that is not is refused here, naming the field.
  """
  n = jax.device_count()
  if n == 1:
    return None
  for group in _TRAIN_GROUPS:
    node = cfg
    for part in group.split("."):
      node = node[part]
    if node.batch_size % n:
      raise ValueError(f"config.{group}.batch_size={node.batch_size} must be a multiple of "
                       f"the {n} devices to split batches over them")
  log.info("data-parallel over %d devices (%d processes)", n, jax.process_count())
  return sharding.make_data_mesh()


def data_for_seed(cfg, data, seed: int):
  """The data of run seed `seed`: `data` itself, or with data.draw_per_seed its own draw of
  classes, forget classes and images (data seed `data.seed + seed`)."""
  if not cfg.data.draw_per_seed or seed == 0:
    return data
  seed_data = data_lib.load_unlearning_data(cfg.data, seed=cfg.data.seed + seed)
  log.info("data of seed %d: %s", seed, seed_data.describe())
  return seed_data


def data_draw(data) -> dict:
  """What a run's data is made of: classes (dataset ids, names), forget classes, counts."""
  return {"seed": int(data.config.seed), "classes": list(data.dataset_classes),
          "class_names": list(data.class_names), "forget_classes": list(data.forget_classes),
          "counts": data.counts()}


def run(cfg: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True) -> dict:
  """Runs (or resumes) the whole experiment in `workdir`; returns the results dict.

  Args:
    cfg: a config from `configs/` (validated here).
    workdir: output folder; created if missing.
    show_progress: tqdm bars on stderr.

  Returns:
    The dict written to `workdir/results.json`.
  """
  cfg = config_lib.validate(cfg)
  with _x64_if(cfg.unlearn.solve_dtype == "float64"):
    return _run(cfg, workdir, show_progress)


@contextlib.contextmanager
def _x64_if(wanted: bool):
  """JAX's 64-bit mode for the run only: a caller's (or the next test's) setting is restored."""
  before = bool(jax.config.read("jax_enable_x64"))
  if wanted and not before:
    jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    if bool(jax.config.read("jax_enable_x64")) != before:
      jax.config.update("jax_enable_x64", before)


def _run(cfg: ml_collections.ConfigDict, workdir: str, show_progress: bool) -> dict:
  # The model's options are checked before the data load (minutes for ImageNet-R): an
  # unknown option is refused by get_model, whatever the number of classes.
  get_model(cfg.model.name, 2, **dict(cfg.model.options))
  wd.claim(workdir, cfg)
  data = data_lib.load_unlearning_data(cfg.data)
  log.info("data: %s", data.describe())
  model = get_model(cfg.model.name, data.num_classes, **dict(cfg.model.options))
  progress = _Progress(workdir, show_progress)
  mesh = data_mesh(cfg)
  pretrained = pretrain_stage(cfg, model, data, workdir, progress, mesh)
  per_seed, draws = {}, {}
  # One Gram computation for every seed: compiled once per data shape, not once per seed.
  gram_fn = gram_stats_fn(cfg, model, tr.split(pretrained)[1], data.num_classes)
  for seed in cfg.seeds:
    log.info("seed %d", seed)
    seed_data = data_for_seed(cfg, data, seed)
    draws[seed] = data_draw(seed_data)
    per_seed[seed] = run_seed(cfg, model, seed_data, pretrained, seed, workdir, progress, mesh,
                              gram_fn=gram_fn)
  population = population_stage(cfg, model, data, pretrained, workdir, progress, mesh)
  progress.close()
  results = report.build_results(cfg, data, model, pretrained, per_seed)
  results["klom"] = population
  report.add_pretrain(results, pretrain_info(workdir))
  # Which classes each seed ran on (with data.draw_per_seed, a draw per seed).
  results["data"]["per_seed"] = {str(s): d for s, d in draws.items()}
  report.write_all(results, workdir)
  return results
