"""Populations of models over many seeds: what the audits that compare distributions need.

`eval.population_seeds` = N. Seeds A (N of them) give Full, Retrain and every method of
`config.methods` (each from its seed's Full); seeds B (N others) give Retrain only, the
reference distribution: a method's models over A are compared with Retrain's over B, and
Retrain over A against B is the noise floor. Every model records its logits on D_f and its
RA and TA (`Population`), which is all KLoM, the ε-score and U-LiRA read.

Linearised closed-form fine-tuning (the default): the seeds differ only in w0's fresh head,
so the network's features on every row and their Jacobian over the body are computed once
(`unlearn.linear.HeadFactors`); each chunk of seeds' tables and Gram statistics is one
compiled program (`vmap`), then each seed's Full and Retrain (`linear.ridge_solution`) and
Fast-NTK's update (the Forgetter's `from_gram_stats`) are solved and checked as on the report
seeds, and the models' logits are one more compiled program. The other
methods run per seed, their tables primed from the same factors (`linear.put_table`).

SGD fine-tuning (`finetune.mode="standard"`, one accelerator; the CPU runs seed by seed,
`sgd_engine_applies`): each chunk's Retrain and Full are one vmapped fit each
(`train.fit_seeds`: the frozen weights shared; each seed its own trainable collection from
its own fresh head, batch order and BN statistics, the protocol of `FineTuner.fit`), as many
seeds a chunk as the compiler says fit in CHUNK_BYTES; Fast-NTK and the other methods then run from each seed's
Full as on the report seeds. Any other mode (cg, serve, a mesh), or a linearised model whose
head is not its last affine step, runs seed by seed as the report seeds do. Each chunk is a
resumable stage (`population/<side>_<k>.npz`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastntk_jax import ntk
from fastntk_jax import train as train_lib
from fastntk_jax import workdir as wd
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.experiment.methods import fastntk as fastntk_method
from fastntk_jax.config import POPULATION_SEED_BASE
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import linear

log = logging.getLogger(__name__)

# The rows of one compiled chunk hold each seed's Jacobian table in the solve dtype: the
# chunk is as many seeds as fit in this many bytes (at least one).
CHUNK_BYTES = 2 ** 30
SECONDS = "seconds"  # a chunk's own wall time, stored beside its outputs
# Whether the SGD engine vmaps the seeds' fits on the CPU too (the tests, the benchmark):
# off, since there it is slower than one fit per seed (`sgd_engine_applies`).
SGD_VMAP_ON_CPU = False
SEEDS = "seeds"  # the seeds of a chunk's rows, stored beside its outputs


@dataclasses.dataclass
class Population:
  """Per-model outputs of a population.

  Attributes:
    logits: {model name: float32 [N, n_f, C]} on D_f; "retrain_b" is seeds B's Retrain.
    ra, ta: {model name: float64 [N]} retain and test accuracies (%) of each model.
    seeds: {"a": [N], "b": [N]} the seeds.
    engine: "batched" (linearised: one compiled program per chunk), "batched_sgd" (Full and
      Retrain of a chunk in one vmapped fit each) or "per_seed".
    seconds: wall time of the models (compilation included): the features once and each
      chunk's own time, also for chunks a resumed run read back from disk.
  """
  logits: dict
  ra: dict
  ta: dict
  seeds: dict
  engine: str
  seconds: float


def seeds_of(n: int) -> dict:
  """Seeds A and B of a population of N: POPULATION_SEED_BASE + k, A first."""
  return {"a": [POPULATION_SEED_BASE + k for k in range(n)],
          "b": [POPULATION_SEED_BASE + n + k for k in range(n)]}


def fresh_heads(model, image_shape, seeds) -> dict:
  """The heads `tr.fresh_head` draws for `seeds`, stacked [S, ...] (one compiled init)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init = jax.jit(jax.vmap(lambda key: model.init(key, x)[tr.TRAINABLE]["head"]))
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  return jax.tree_util.tree_map(np.asarray, init(keys))


# ------------------------------------------------------------------------------------------
# Stages: one .npz per chunk.
# ------------------------------------------------------------------------------------------


def _npz_stage(path: str, compute, seeds=None) -> dict:
  """`compute()`'s outputs, kept at `path`: read back when the file holds them. With `seeds`
  (the chunk's, in order), a file is read back only when its rows are of those seeds (a run
  resumed with another chunking: another engine, device count or backend); it is
  recomputed otherwise."""
  if os.path.exists(path):
    with np.load(path) as z:
      value = {k: z[k] for k in z.files}
    if seeds is None or (SEEDS in value and value[SEEDS].tolist() == [int(s) for s in seeds]):
      return value
    log.info("population: %s holds other seeds than this chunk's (another chunking): "
             "recomputed", path)
  value = {k: np.asarray(v) for k, v in compute().items()}
  if seeds is not None:
    value[SEEDS] = np.asarray([int(s) for s in seeds], np.int64)
  buf = io.BytesIO()
  np.savez(buf, **value)
  wd.atomic_write_bytes(path, buf.getvalue())
  return value


def _pack(records: list[dict]) -> dict:
  """[{name: (logits [n_f, C], ra, ta)}] of S seeds -> {"name/logits": [S, n_f, C], ...}."""
  out = {}
  for name in records[0]:
    out[f"{name}/logits"] = np.stack([np.asarray(r[name][0], np.float32) for r in records])
    out[f"{name}/ra"] = np.asarray([r[name][1] for r in records], np.float64)
    out[f"{name}/ta"] = np.asarray([r[name][2] for r in records], np.float64)
  return out


# ------------------------------------------------------------------------------------------
# The batched engine: linearised closed form, head factorised.
# ------------------------------------------------------------------------------------------


class _Batched:
  """One compiled program per chunk of seeds; see the module docstring."""

  def __init__(self, setup, data, factors, dtype):
    cfg = setup.cfg
    self.setup, self.data, self.factors, self.dtype = setup, data, factors, dtype
    self.damping = float(cfg.unlearn.damping)
    self.body = {k: v for k, v in setup.w_pre.items() if k != linear.HEAD}
    n_r, n_f = data.retain.size, data.forget.size
    self.rows = {"retain": slice(0, n_r), "forget": slice(n_r, n_r + n_f),
                 "test": slice(n_r + n_f, n_r + n_f + data.test_retain.size)}
    self.y = jnp.asarray(np.concatenate([data.retain.y, data.forget.y, data.test_retain.y]))
    self.c = data.num_classes
    self.plan = None
    self._programs = {}
    self.forgetter = setup.forgetter

  def _plan(self, head0):
    """The Fast-NTK plan of the report seeds' shared-Gram path (primal, the reference
    model's), from one seed's w0 (the plan depends on shapes and dtypes only)."""
    if self.plan is None:
      w0 = {**self.body, linear.HEAD: jax.tree_util.tree_map(jnp.asarray, head0)}
      d = self.data
      plan = self.setup.forgetter.plan(
          w0, w0, (jnp.asarray(d.retain.x), jnp.asarray(d.retain.y)),
          (jnp.asarray(d.forget.x), jnp.asarray(d.forget.y)), traced=True)
      self.plan = fastntk_method.reference_model_plan(plan, "population: the shared Gram path")
    return self.plan

  def _grams_program(self):
    """vmapped over heads: the Gram statistics (G, b) of D_r and of D_f at each seed's w0."""
    if "grams" not in self._programs:
      rows, c, dtype = self.rows, self.c, self.dtype

      def grams(factors, y, head):
        f0, jac = factors.tables(head, dtype)
        resid = jax.nn.one_hot(y, c, dtype=dtype) - f0
        with jax.default_matmul_precision("highest"):
          return {part: ntk.gram_from_rows(jac[rows[part]], resid[rows[part]])
                  for part in ("retain", "forget")}
      self._programs["grams"] = jax.jit(jax.vmap(grams, in_axes=(None, None, 0)))
    return self._programs["grams"]

  def _outputs_program(self):
    """vmapped over heads and the models' params: logits on D_f, RA and TA of each model."""
    if "outputs" not in self._programs:
      rows, dtype = self.rows, self.dtype

      def outputs(factors, body, y, head, models):
        f0, jac = factors.tables(head, dtype)
        w0 = {**body, linear.HEAD: head}
        flat = lambda w: jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(w)
                                          ]).astype(dtype)
        out = {}
        for name, w in models.items():
          with jax.default_matmul_precision("highest"):
            z = f0 + jnp.einsum("ncp,p->nc", jac, flat(w) - flat(w0))
          hit = jnp.argmax(z, axis=-1) == y
          acc = lambda part: 100.0 * jnp.mean(hit[rows[part]].astype(dtype))
          out[name] = (z[rows["forget"]].astype(jnp.float32), acc("retain"), acc("test"))
        return out
      self._programs["outputs"] = jax.jit(jax.vmap(outputs, in_axes=(None, None, None, 0, 0)))
    return self._programs["outputs"]

  def chunk(self, heads: dict, with_methods: bool):
    """({name: (logits [S, n_f, C], ra [S], ta [S])}, Full's params [S, ...] or None).

    The seeds' Gram statistics are one vmapped program; each seed's solves then run as the
    report seeds' do (`linear.ridge_solution`, the Forgetter's `from_gram_stats`, checked
    seed by seed): LAPACK factorisations vmapped inside one program stall XLA's CPU runtime
    now and then (jaxlib 0.10, 2 cores), so none is."""
    self._plan(jax.tree_util.tree_map(lambda a: a[0], heads))
    heads = jax.tree_util.tree_map(jnp.asarray, heads)
    grams = self._grams_program()(self.factors, self.y, heads)
    lam = jnp.asarray(self.damping, self.dtype)
    models = {"retrain": []} if not with_methods else {"retrain": [], "full": [], "fastntk": []}
    for i in range(len(heads["bias"])):
      w0 = {**self.body, linear.HEAD: jax.tree_util.tree_map(lambda a: a[i], heads)}
      stats_r, stats_f = ((grams[part][0][i], grams[part][1][i])
                          for part in ("retain", "forget"))
      models["retrain"].append(linear.ridge_solution(w0, [stats_r], lam))
      if with_methods:
        full = linear.ridge_solution(w0, [stats_r, stats_f], lam)
        models["full"].append(full)
        models["fastntk"].append(
            self.setup.forgetter.from_gram_stats(full, stats_r, stats_f, self.plan)[0])
    stacked = {name: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ws)
               for name, ws in models.items()}
    return self.outputs(heads, stacked), stacked.get("full")

  def outputs(self, heads: dict, models: dict) -> dict:
    """{name: (logits on D_f [S, n_f, C], RA [S], TA [S])} of models {name: params [S, ...]}
    (one compiled program: f_lin by the seeds' tables)."""
    out = self._outputs_program()(self.factors, self.body, self.y,
                                  jax.tree_util.tree_map(jnp.asarray, heads), models)
    return jax.tree_util.tree_map(np.asarray, out)


def _factors(setup, data, dtype) -> Optional[linear.HeadFactors]:
  x = np.concatenate([data.retain.x, data.forget.x, data.test_retain.x])
  return linear.head_factors(setup.model, setup.frozen_pre, setup.w_pre, x,
                             batch_size=int(setup.cfg.eval.batch_size),
                             max_bytes=CHUNK_BYTES)


def _factors_hold(setup, data, factors, seeds: dict, n: int) -> bool:
  """The factors checked against the network (`HeadFactors.matches`) at the first head of
  every chunk: a head that drives the logits into a nonlinearity the pre-trained head did
  not reach would make them wrong for that seed."""
  x = np.concatenate([data.retain.x, data.forget.x, data.test_retain.x])
  size = _chunk_size(data, tr.count_params(setup.w_pre), factors.features.dtype, n)
  firsts = [seeds[side][lo] for side in ("a", "b") for lo in range(0, n, size)]
  heads = fresh_heads(setup.model, data.image_shape, firsts)
  for i, seed in enumerate(firsts):
    w0 = {**setup.w_pre, linear.HEAD: jax.tree_util.tree_map(lambda a: a[i], heads)}
    if not factors.matches(setup.model, setup.frozen_pre, w0, x,
                           batch_size=int(setup.cfg.eval.batch_size)):
      log.warning("population: the head-factorised tables differ from the network's at seed "
                  "%d; every seed runs one at a time", seed)
      return False
  return True


def _chunk_size(data, num_params: int, dtype, n: int) -> int:
  rows = data.retain.size + data.forget.size + data.test_retain.size
  per_seed = rows * data.num_classes * num_params * jnp.dtype(dtype).itemsize
  return int(max(1, min(n, CHUNK_BYTES // max(per_seed, 1))))


# ------------------------------------------------------------------------------------------
# Per-seed models (the other methods on the batched path; everything otherwise).
# ------------------------------------------------------------------------------------------


def _accuracy_records(net, params, frozen, data, batch_size: int):
  logits = train_lib.predict(net, params, frozen,
                             np.concatenate([data.forget.x, data.retain.x, data.test_retain.x]),
                             batch_size=batch_size)
  n_f, n_r = data.forget.size, data.retain.size
  acc = lambda z, y: 100.0 * float(np.mean(np.argmax(z, -1) == y))
  return (np.asarray(logits[:n_f], np.float32), acc(logits[n_f:n_f + n_r], data.retain.y),
          acc(logits[n_f + n_r:], data.test_retain.y))


@dataclasses.dataclass(frozen=True)
class Harness:
  """What the population takes from the harness (`experiment.run`), passed in so that this
  module does not import it: `method_context(setup, tuner, data, seed, method, full, w0)`,
  `frozen_of(tuner, out)`, `make_fit(setup, num_classes)`, the fine-tuner class
  (`experiment.finetune.FineTuner`) and `released_frozen(tuner, data, name, params, frozen,
  seed)`: a released model's frozen side, its BN statistics recomputed on the data its
  method may see, so the population's models are the report seeds' (no D_f in Retrain's or
  a method's statistics)."""
  method_context: Callable
  frozen_of: Callable
  make_fit: Callable
  fine_tuner: Callable
  released_frozen: Callable


def _method_params(harness: Harness, setup, data, seed: int, tuner, full: dict, methods,
                   factors=None) -> dict:
  """{name: trainable params} of `methods` run from this seed's Full."""
  frozen_full = harness.frozen_of(tuner, full)
  if factors is not None:  # prime the tables every plug-in's tabulated fit would compute
    f0, jac = _tables_fn(factors, tuner.w0[linear.HEAD])
    n_r, n_f = data.retain.size, data.forget.size
    for x, lo, hi in ((data.retain.x, 0, n_r), (data.forget.x, n_r, n_r + n_f)):
      linear.put_table(tuner.net, frozen_full, tuner.w0, x, f0[lo:hi], jac[lo:hi])
  out = {}
  for method in methods:
    ctx = harness.method_context(setup, tuner, data, seed, method, full, tuner.w0)
    out[method.name] = method.run(ctx, methods_lib.block(setup.cfg, method)).params
  return out


@jax.jit
def _tables_fn(factors, head):
  f0, jac = factors.tables(head)
  return f0, jac


def _per_seed(harness: Harness, setup, data, seed: int, with_methods: bool) -> dict:
  cfg = setup.cfg
  w0 = tr.fresh_head(setup.w_pre, setup.model, data.image_shape, seed)
  tuner = harness.fine_tuner(cfg, setup.model, setup.frozen_pre, w0, data, seed,
                             forgetter=setup.forgetter,
                             fit=harness.make_fit(setup, data.num_classes),
                             mesh=setup.mesh)
  retrain, _ = tuner.fit(data.retain, "retrain")
  fitted = {"retrain": retrain}
  if with_methods:
    fitted["full"], _ = tuner.fit(data.train, "full")
  return _records(harness, setup, data, seed, tuner, fitted, with_methods)


def _records(harness: Harness, setup, data, seed: int, tuner, fitted: dict,
             with_methods: bool) -> dict:
  """{name: (logits on D_f, RA, TA)} of one seed's Retrain (and Full and every method from
  Full, when `with_methods`), each evaluated as released (`Harness.released_frozen`).
  `fitted`: {"retrain"[, "full"]: {"trainable"[, "batch_stats"]}}."""
  cfg = setup.cfg

  def record(name, params, frozen):
    released = harness.released_frozen(tuner, data, name, params, frozen, seed)
    return _accuracy_records(tuner.net, params, released, data, cfg.eval.batch_size)

  out = {tag: record(tag, model["trainable"], harness.frozen_of(tuner, model))
         for tag, model in fitted.items()}
  if with_methods:
    full = fitted["full"]
    frozen_full = harness.frozen_of(tuner, full)
    for name, params in _method_params(harness, setup, data, seed, tuner, full,
                                       setup.methods).items():
      out[name] = record(name, params, frozen_full)
  return out


# ------------------------------------------------------------------------------------------
# SGD fine-tuning: the seeds' fits vmapped (`train.fit_seeds`).
# ------------------------------------------------------------------------------------------


def sgd_chunk_size(setup, data, n: int) -> int:
  """Seeds per compiled SGD chunk: as many as fit in CHUNK_BYTES by the compiler's count of
  one seed's step (`train.step_memory_bytes`), at least one; 8 when the backend does not
  report it."""
  spec = train_lib.TrainSpec.from_config(setup.cfg.finetune)
  per_seed = train_lib.step_memory_bytes(
      setup.model, spec, data.num_classes, setup.w_pre, setup.frozen_pre,
      (min(spec.batch_size, data.train.size),) + tuple(data.image_shape))
  if per_seed is None:
    return int(min(n, 8))
  return int(max(1, min(n, CHUNK_BYTES // max(per_seed, 1))))


def _sgd_chunk(harness: Harness, setup, data, chunk_seeds, with_methods: bool) -> list:
  """[{name: (logits on D_f, RA, TA)}] of each seed of the chunk: Retrain (and Full) of
  every seed in one vmapped fit each (`train.fit_seeds`, bit for bit the protocol of
  `FineTuner.fit`), then the methods from each seed's Full as on the report seeds."""
  cfg = setup.cfg
  s = len(chunk_seeds)
  heads = fresh_heads(setup.model, data.image_shape, chunk_seeds)
  body = {k: v for k, v in setup.w_pre.items() if k != linear.HEAD}
  w0s = {**jax.tree_util.tree_map(lambda a: np.broadcast_to(a, (s,) + np.shape(a)), body),
         linear.HEAD: heads}
  spec = train_lib.TrainSpec.from_config(cfg.finetune)
  take = lambda tree, i: None if tree is None else jax.tree_util.tree_map(lambda a: a[i], tree)
  fits = {"retrain": data.retain, **({"full": data.train} if with_methods else {})}
  fitted = {}
  for tag, split in fits.items():
    params, stats, _ = train_lib.fit_seeds(setup.model, w0s, setup.frozen_pre, split, spec,
                                           data.num_classes, seeds=chunk_seeds)
    fitted[tag] = [{"trainable": take(params, i),
                    **({"batch_stats": take(stats, i)} if stats is not None else {})}
                   for i in range(s)]
  records = []
  for i, seed in enumerate(chunk_seeds):
    tuner = harness.fine_tuner(cfg, setup.model, setup.frozen_pre, take(w0s, i), data, seed,
                               forgetter=setup.forgetter,
                               fit=harness.make_fit(setup, data.num_classes), mesh=setup.mesh)
    records.append(_records(harness, setup, data, seed, tuner,
                            {tag: models[i] for tag, models in fitted.items()}, with_methods))
  return records


# ------------------------------------------------------------------------------------------
# The stage.
# ------------------------------------------------------------------------------------------


def batched_engine_applies(cfg) -> bool:
  """Whether the population can take the batched engine (before the model is checked)."""
  return (cfg.finetune.mode == "linearized" and cfg.finetune.linearized_solver == "closed_form"
          and cfg.unlearn.linearize_at == "init" and not cfg.unlearn.serve)


def sgd_engine_applies(cfg, mesh=None) -> bool:
  """Whether Full and Retrain of the population are fitted by SGD vmapped over the seeds:
  standard fine-tuning on one accelerator (a data mesh splits each seed's batches instead).
  On the CPU the seeds run one at a time: there XLA's code for the vmapped step ran 2-3x
  slower than as many separate steps (benchmarks/RESULTS.md §23)."""
  return (cfg.finetune.mode == "standard" and (mesh is None or int(mesh.size) == 1)
          and (SGD_VMAP_ON_CPU or jax.default_backend() != "cpu"))


def build(setup, data, harness: Harness) -> Optional[Population]:
  """The population of `eval.population_seeds` (None when 0 or without Fast-NTK)."""
  cfg = setup.cfg
  n = int(cfg.eval.population_seeds)
  if n == 0 or "fastntk" not in cfg.methods:
    return None
  pdir = os.path.join(setup.workdir, "population")
  os.makedirs(pdir, exist_ok=True)
  seeds = seeds_of(n)
  start = time.perf_counter()
  dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  factors = _factors(setup, data, dtype) if batched_engine_applies(cfg) else None
  if factors is not None and not _factors_hold(setup, data, factors, seeds, n):
    factors = None
  others = [m for m in setup.methods if m.name != "fastntk"]
  setup_seconds = time.perf_counter() - start  # the factors and their checks
  if factors is not None:
    engine = _Batched(setup, data, factors, dtype)
    size = _chunk_size(data, tr.count_params(setup.w_pre), dtype, n)
    log.info("population: %d + %d seeds, batched in chunks of %d (features and their "
             "Jacobian computed once)", n, n, size)

    def chunk_outputs(chunk_seeds, with_methods):
      heads = fresh_heads(setup.model, data.image_shape, chunk_seeds)
      out, full = engine.chunk(heads, with_methods=with_methods)
      if with_methods and others:
        params = []
        for i, seed in enumerate(chunk_seeds):
          w0 = {**engine.body, linear.HEAD: jax.tree_util.tree_map(lambda a: a[i], heads)}
          tuner = harness.fine_tuner(cfg, setup.model, setup.frozen_pre, w0, data, seed,
                                     forgetter=setup.forgetter, fit=None, mesh=setup.mesh)
          full_i = {"trainable": jax.tree_util.tree_map(lambda a: a[i], full)}
          params.append(_method_params(harness, setup, data, seed, tuner, full_i, others,
                                       factors=factors))
        stacked = {m.name: jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                                  *[p[m.name] for p in params])
                   for m in others}
        out.update(engine.outputs(heads, stacked))
      return {f"{name}/{part}": v for name, (logits, ra, ta) in out.items()
              for part, v in (("logits", logits), ("ra", ra), ("ta", ta))}
    engine_name = "batched"
  elif sgd_engine_applies(cfg, setup.mesh):
    size = sgd_chunk_size(setup, data, n)
    log.info("population: %d + %d seeds, SGD fine-tuning vmapped over chunks of %d seeds",
             n, n, size)
    chunk_outputs = lambda chunk_seeds, with_methods: _pack(
        _sgd_chunk(harness, setup, data, chunk_seeds, with_methods=with_methods))
    engine_name = "batched_sgd"
  else:
    size = 1
    log.info("population: %d + %d seeds, one at a time (the batched engines need closed-form "
             "linearised fine-tuning at w0 with a head that is the network's last affine "
             "step, or SGD fine-tuning on one accelerator)", n, n)
    chunk_outputs = lambda chunk_seeds, with_methods: _pack(
        [_per_seed(harness, setup, data, seed, with_methods=with_methods)
         for seed in chunk_seeds])
    engine_name = "per_seed"
  chunks = []
  for side in ("a", "b"):
    for k, lo in enumerate(range(0, n, size)):
      chunk_seeds = seeds[side][lo:lo + size]

      def compute(side=side, chunk_seeds=chunk_seeds, lo=lo):
        t = time.perf_counter()
        packed = chunk_outputs(chunk_seeds, side == "a")
        packed[SECONDS] = np.asarray(time.perf_counter() - t)
        log.info("population: seeds %s %d-%d of %d in %.1f s", side.upper(), lo + 1,
                 lo + len(chunk_seeds), n, packed[SECONDS])
        return packed
      chunks.append((side, _npz_stage(os.path.join(pdir, f"{side}_{k}.npz"), compute,
                                      chunk_seeds)))
  logits, ra, ta = {}, {}, {}
  # The models' time: each chunk's own, also when a resumed run read it back from disk.
  seconds = sum(float(packed.get(SECONDS, 0.0)) for _, packed in chunks)
  for side, packed in chunks:
    for key, value in packed.items():
      if key in (SECONDS, SEEDS):
        continue
      name, part = key.rsplit("/", 1)
      name = "retrain_b" if side == "b" else name
      {"logits": logits, "ra": ra, "ta": ta}[part].setdefault(name, []).append(value)
  cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}
  return Population(logits=cat(logits), ra=cat(ra), ta=cat(ta), seeds=seeds,
                    engine=engine_name, seconds=seconds + setup_seconds)


# ------------------------------------------------------------------------------------------
# The audits of a population.
# ------------------------------------------------------------------------------------------


def audits(pop: Population, forget_labels, *, ulira_seed: int = 0) -> dict:
  """KLoM (`klom`), the ε-score (`epsilon_score`) and U-LiRA (`ulira`) of every model of the
  population against seeds B's Retrain, on the margins of D_f (= the logit-scaled
  confidence the ε-score and U-LiRA read). Retrain over A is the noise floor of each.

  Raises:
    FloatingPointError: a model with non-finite logits (a diverged method), named.

  Returns:
    {"klom": {"num_seeds", "floor": "retrain", "per_method": {name: klom.summary}},
     "per_method": {name: {"epsilon": epsilon_score dict, "ulira": ulira dict}},
     "num_seeds", "engine", "seconds"}.
  """
  from fastntk_jax import epsilon_score  # pylint: disable=g-import-not-at-top
  from fastntk_jax import klom  # pylint: disable=g-import-not-at-top
  from fastntk_jax import ulira  # pylint: disable=g-import-not-at-top
  y = np.asarray(forget_labels)
  for name, logits in pop.logits.items():  # a diverged model is an error, not a NaN audit
    bad = ~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
    if bad.any():
      raise FloatingPointError(
          f"population: {name}'s models of seeds {np.flatnonzero(bad).tolist()[:5]} (index in "
          f"{'B' if name == 'retrain_b' else 'A'}) have non-finite logits on D_f; the audits "
          "would be NaN (check that method's settings)")
  margins = {name: np.stack([klom.margins(z, y) for z in logits])
             for name, logits in pop.logits.items()}
  reference = margins["retrain_b"]
  n = int(reference.shape[0])
  names = [name for name in pop.logits if name != "retrain_b"]
  per_klom, per = {}, {}
  for name in names:
    per_klom[name] = klom.summary(klom.klom(margins[name], reference))
    eps = epsilon_score.epsilon_score(
        margins[name], reference, ra_unlearned=float(np.mean(pop.ra[name])),
        ra_retrain=float(np.mean(pop.ra["retrain_b"])),
        ta_unlearned=float(np.mean(pop.ta[name])),
        ta_retrain=float(np.mean(pop.ta["retrain_b"])))
    per[name] = {"epsilon": eps, "ulira": ulira.ulira(margins[name], reference, seed=ulira_seed)}
  return {"klom": {"num_seeds": n, "floor": "retrain", "per_method": per_klom},
          "per_method": per, "num_seeds": n, "engine": pop.engine, "seconds": pop.seconds}
