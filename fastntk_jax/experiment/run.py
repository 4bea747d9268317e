"""The main job: pre-train → fine-tune (Full) → Retrain → every method of `config.methods` →
evaluate, for several seeds, then the KLoM population; resumable stage by stage.

`run` resolves the config once (the model, the network's `apply_fn` at w0, one Forgetter
with `config.unlearn`'s options, the training protocol) and passes them down; the methods are
plug-ins (`experiment.methods`) that the harness runs and reports without naming them.
Everything is validated before the workdir is touched: a refused run leaves nothing behind.

Every stage writes its result atomically into the workdir and is skipped when that result
is already there, so a killed run restarted with the same command continues where it
stopped and ends with the same numbers. A workdir holding another config, or held by
another running process, is refused.

Workdir layout:
  config.json                  the validated config (compared on restart)
  .lock                        held while a run works in it (pid, host)
  pretrain/, pretrain.json     pre-trained variables (orbax) and what they are
  seed_<s>/<method>/           trainable params (+ batch_stats) of each method (orbax)
  seed_<s>/<method>.json       that method's metrics
  seed_<s>/<method>_diagnostics.json   what the method reported (solver, timings, ...)
  seed_<s>/<method>_bn_stats/  the BN running statistics of its released model, recomputed
                               on the data it may see (standard fine-tuning, BN in train mode)
  seed_<s>/<method>_bn.json    which data, and UA/RA/TA before the recomputation
  seed_<s>/probe_<kind>.json   linear-probe accuracies
  population/<a|b>_<k>.npz     the population's outputs per chunk of seeds (audits)
  audit/                       the deletions' hash-chained log (`fastntk_jax.audit`)
  results.json, results.md, *.png, tb/   the report (`experiment.report`)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from fastntk_jax import audit
from fastntk_jax import config as config_lib
from fastntk_jax import faults
from fastntk_jax import linalg
from fastntk_jax import objectives
from fastntk_jax import signing
from fastntk_jax import train as train_lib
from fastntk_jax import workdir as wd
from fastntk_jax.experiment import evaluate
from fastntk_jax.experiment import finetune
from fastntk_jax.experiment import methods as methods_lib
from fastntk_jax.experiment import population
from fastntk_jax.experiment import pretrain
from fastntk_jax.experiment.prepare import (POPULATION_SEED_BASE, Prepared, data_draw,
                                            data_for_seed, prepare, resolve_forget_set)
from fastntk_jax.experiment import progress as progress_lib
from fastntk_jax.experiment import report
from fastntk_jax.experiment import stages
from fastntk_jax.experiment import tuning
from fastntk_jax.models import trainable as tr
from fastntk_jax.unlearn import api as unlearn_api
from fastntk_jax.unlearn import certificate
from fastntk_jax.unlearn import linear
from fastntk_jax.unlearn import release as release_lib

log = logging.getLogger(__name__)
PyTree = Any



@dataclasses.dataclass(frozen=True)
class Setup:
  """What `run` resolves once from the config and passes down.

  Attributes:
    cfg: the validated config. workdir: the run's folder.
    model: the Flax model (the task's head). frozen_pre: its pre-trained frozen collections.
    w_pre: the pre-trained trainable collection (head included; each seed draws a fresh one).
    forgetter: the one `unlearn.Forgetter` (config.unlearn's options, the network at w0).
    methods: the plug-ins of `config.methods`, in order.
    progress: bars and TensorBoard scalars. mesh: the data-parallel mesh or None.
    signing_key: the operator's Ed25519 key that signs the deletion log (None: no method
      that records deletions runs).
  """
  cfg: ml_collections.ConfigDict
  workdir: str
  model: Any
  frozen_pre: dict
  w_pre: PyTree
  forgetter: Any
  methods: tuple
  progress: Any
  mesh: Any
  signing_key: Any = None


def make_forgetter(cfg, model, frozen_pre: dict, num_classes: int):
  """The run's one Forgetter: `config.unlearn`'s options, the network's apply_fn at the
  pre-trained frozen collections (BatchNorm in inference mode, docs/derivation.md §1)."""
  u = cfg.unlearn
  return unlearn_api.make_forgetter(
      tr.make_apply_fn(model, frozen_pre), num_classes=num_classes, damping=float(u.damping),
      solver=u.solver, batch_size=u.batch_size, kernel_impl=u.kernel_impl,
      solve_dtype=config_lib.solve_dtype(cfg), linearize_at=u.linearize_at,
      step_scale=float(u.step_scale), max_cache_bytes=int(u.jacobian_cache_gib * 2 ** 30),
      duplicate_tolerance=float(u.duplicate_tolerance))


def make_fit(setup: Setup, num_classes: int):
  """`train.fit` with the run's progress bars and mesh: `(net, params, frozen, split, spec, *,
  seed, tag, checkpoint_path=None, stop_below=None) -> (params, batch_stats, history)`."""
  def fit(net, params, frozen, split, spec, *, seed, tag, checkpoint_path=None,
          stop_below=None):
    return train_lib.fit(net, params, frozen, split, spec, num_classes, seed=seed,
                         stop_below=stop_below, checkpoint_path=checkpoint_path, tag=tag,
                         progress=setup.progress.epochs(tag, spec.epochs), mesh=setup.mesh)
  return fit


def train_streams(net, params, frozen, streams, spec, *, seed, on_epoch=None, tag=""):
  """Plain training on data streams (`objectives.fit_objective` with `objectives.lead_loss`):
  the relearning attack's fine-tuning."""
  return objectives.fit_objective(net, params, frozen, streams, objectives.lead_loss, spec,
                                  seed=seed, on_epoch=on_epoch, tag=tag)


def _method_fits(setup: Setup, ctx_net, frozen, num_classes: int, seed: int, name: str,
                 folder: Optional[str]):
  """`methods.Context.fit` and `.fit_objective` for method `name`: timed, resumable under its
  stage's folder.

  Each call of one method's run has its own checkpoint (`<name>.partial`, then
  `<name>.<k>.partial` for the k-th call, both kinds of fit counted together): a method that
  trains in phases resumes each phase from its own state, never a later phase from an
  earlier one's. The calls come in the same order when a killed run is resumed (a plug-in's
  run is deterministic)."""
  fit = make_fit(setup, num_classes)
  calls = [0]

  def checkpoint():
    k, calls[0] = calls[0], calls[0] + 1
    return None if folder is None else os.path.join(
        folder, f"{name}.partial" if k == 0 else f"{name}.{k}.partial")

  def method_fit(params, split, spec, *, seed_offset, tag=None):
    path = checkpoint()
    start = time.perf_counter()
    out, _, _ = fit(ctx_net, params, frozen, split, spec, seed=seed + seed_offset,
                    tag=tag or f"seed{seed}/{name}", checkpoint_path=path)
    return out, time.perf_counter() - start

  def method_fit_objective(params, streams, objective, spec, *, seed_offset, hparams=None,
                           aux=None, grad_mask=None, batch_sizes=None, passes=None, tag=None):
    path = checkpoint()
    tag = tag or f"seed{seed}/{name}"
    start = time.perf_counter()
    # A linearised network is trained tabulated on the streams' inputs where J fits.
    net, net_frozen = ctx_net, frozen
    tabulated = linear.tabulated_streams(ctx_net, frozen, streams, tag)
    if tabulated is not None:
      net, net_frozen, streams = tabulated
    out, _ = objectives.fit_objective(
        net, params, net_frozen, streams, objective, spec, seed=seed + seed_offset,
        hparams=hparams, aux=aux, grad_mask=grad_mask, batch_sizes=batch_sizes, passes=passes,
        progress=setup.progress.epochs(tag, spec.epochs), checkpoint_path=path, tag=tag)
    return out, time.perf_counter() - start
  return method_fit, method_fit_objective


def method_context(setup: Setup, tuner, data, seed: int, method, full: dict, w0, *,
                   folder: Optional[str] = None, record: bool = False) -> methods_lib.Context:
  """What `method` receives for one seed (`methods.Context`), from the seed's fine-tuning
  (`tuner`, Full's `full` = {"trainable", maybe "batch_stats"}): the report's seeds keep
  their files in `folder` and are recorded; the population's and the tuning's keep none."""
  frozen_full = frozen_of(tuner, full)
  fit, fit_objective = _method_fits(setup, tuner.net, frozen_full, data.num_classes, seed,
                                    method.name, folder)
  return methods_lib.Context(
      seed=seed, net=tuner.net, frozen=frozen_full, w0=w0, full=full["trainable"], data=data,
      linearized=tuner.linearized, forgetter=setup.forgetter, fit=fit,
      fit_objective=fit_objective,
      grams=tuner.shared_grams if _shares_grams(setup.cfg, tuner) else None,
      kernel=tuner.shared_kernel if _shares_kernel(setup.cfg, tuner) else None, folder=folder,
      workdir=setup.workdir if record else None, record=record, mesh=setup.mesh)


def frozen_of(tuner, out: dict) -> dict:
  """The frozen side of a fine-tuned model: its BN statistics (updated only in train mode)."""
  return {**tuner.frozen_net, **({"batch_stats": out["batch_stats"]}
                                 if "batch_stats" in out else {})}


def certify_deletion(setup, ctx, params, data, diagnostics: dict, retrain,
                     deployed_path: str, measure) -> tuple[dict, Any]:
  """The certificate of a deletion (`Forgetter.certify`), its certified release when
  `unlearn.certified` (`unlearn.release`) with the accuracy cost of each ε of
  `unlearn.release_epsilons`, and its signed record in the workdir's audit log
  (`fastntk_jax.audit`). `measure(params) -> {"ua", "ra", "ta", ...}` evaluates a model
  (`evaluate.accuracies`). Returns (the diagnostics entries to add, the deployed params:
  `params`, or the released ones)."""
  cfg, forgetter = setup.cfg, setup.forgetter
  u = cfg.unlearn
  start = time.perf_counter()
  retain = (data.retain.x, data.retain.y)
  # The one linearised model of the run: the Gram statistics Full, Retrain and the update
  # were solved from, when linearised fine-tuning computed them.
  stats = ctx.grams()[0][0] if ctx.grams is not None else None
  cert = forgetter.certify(ctx.w0, params, retain, linearized=ctx.linearized,
                           retain_stats=stats)
  seconds = time.perf_counter() - start
  extra = {}
  if stats is not None:
    extra["reference"] = certificate.reference_distances(
        ctx.w0, params, retrain, stats, float(cfg.unlearn.damping), cert.distance_bound)
  request_id = f"seed{ctx.seed}/fastntk"
  log.info("%s: certificate: %s", request_id, cert.statement)
  extra["certified"] = bool(cert.retrain_relative_bound <= u.certify_threshold)
  deployed, release = params, None
  if math.isfinite(cert.distance_bound) and cert.distance_bound > 0:
    extra["release_cost"] = _release_cost(setup, ctx, params, cert, measure)
  if u.certified:
    if not extra["certified"]:
      raise ValueError(f"{request_id}: unlearn.certified=True, but the certificate bounds "
                       f"‖w − w_r‖ by {cert.retrain_relative_bound:.3g} of ‖w_r − w0‖, above "
                       f"unlearn.certify_threshold={u.certify_threshold:g}: no release is "
                       "certified (use linearised fine-tuning, finetune.mode='linearized')")
    deployed, release = release_lib.certified_release(
        params, cert, epsilon=float(u.epsilon), delta=float(u.delta),
        noise_seed=audit.release_seed(setup.signing_key, request_id, params))
    extra["release"] = release.as_dict()
    log.info("%s: released with noise: %s", request_id, release.statement)
  record = audit.record_deletion(
      setup.workdir, request_id=request_id,
      model={"name": cfg.model.name, "num_classes": int(data.num_classes),
             "options": wd.config_dict(cfg)["model"]["options"]},
      frozen=setup.frozen_pre, params_init=ctx.w0, params=params, retain=retain,
      forget=(data.forget.x, data.forget.y),
      # D is D_r followed by D_f (`data.train`): the forgotten ids are D_f's rows of D.
      forget_ids=np.arange(data.retain.size, data.retain.size + data.forget.size),
      damping=float(cfg.unlearn.damping), solver=diagnostics.get("solver"),
      certificate=cert, batch_size=cfg.unlearn.batch_size, retain_stats=stats,
      signing_key=setup.signing_key, release=release, deployed_path=deployed_path,
      certify_threshold=float(u.certify_threshold))
  return {"certificate": cert.as_dict(), "certificate_seconds": seconds,
          "audit_record": record["index"], **extra}, deployed


def _release_cost(setup, ctx, params, cert, measure) -> dict:
  """UA/RA/TA of `params` and of its certified releases at each ε of
  `unlearn.release_epsilons` (δ = `unlearn.delta`): what the guarantee costs in accuracy."""
  u = setup.cfg.unlearn
  out = {"none": measure(params), "delta": float(u.delta), "by_epsilon": {}}
  for eps in u.release_epsilons:
    # Noise of the operator's secret seed, as the release's (its cost is what it reports).
    noised, rel = release_lib.certified_release(
        params, cert, epsilon=float(eps), delta=float(u.delta),
        noise_seed=audit.release_seed(setup.signing_key, f"seed{ctx.seed}/fastntk", params))
    out["by_epsilon"][f"{float(eps):g}"] = {**measure(noised), "sigma": rel.sigma}
  return out


def run_seed(setup: Setup, data, seed: int) -> dict:
  """Full, Retrain and every method for one seed, evaluated; {"methods", "probes"}."""
  cfg, model = setup.cfg, setup.model
  sdir = os.path.join(setup.workdir, f"seed_{seed}")
  os.makedirs(sdir, exist_ok=True)
  w0 = tr.fresh_head(setup.w_pre, model, data.image_shape, seed)
  fit = make_fit(setup, data.num_classes)
  tuner = finetune.FineTuner(cfg, model, setup.frozen_pre, w0, data, seed,
                             forgetter=setup.forgetter, fit=fit, mesh=setup.mesh)
  timings = {}

  def finetune_stage(split, tag):
    def compute():
      out, timings[tag] = tuner.fit(split, tag, checkpoint_path=os.path.join(sdir, f"{tag}.partial"))
      return out
    target = {"trainable": w0}
    if "batch_stats" in setup.frozen_pre and not tuner.linearized:
      target["batch_stats"] = setup.frozen_pre["batch_stats"]
    return stages.array_stage(os.path.join(sdir, tag), target, compute)

  full = finetune_stage(data.train, "full")
  retrain = finetune_stage(data.retain, "retrain")
  frozen_full = frozen_of(tuner, full)
  models_of = {"full": (full["trainable"], frozen_full),
               "retrain": (retrain["trainable"], frozen_of(tuner, retrain))}
  diagnostics = {}
  for method in setup.methods:
    name = method.name
    ctx = method_context(setup, tuner, data, seed, method, full, w0, folder=sdir, record=True)
    diag_path = os.path.join(sdir, f"{name}_diagnostics.json")

    def compute(method=method, ctx=ctx, diag_path=diag_path):
      result = method.run(ctx, methods_lib.block(cfg, method))
      timings[method.name] = result.seconds
      diag = dict(result.diagnostics)
      params = result.params
      if method.name == "fastntk":
        entries, params = certify_deletion(
            setup, ctx, params, data, diag, retrain["trainable"],
            os.path.relpath(os.path.join(sdir, name), setup.workdir),
            # Each release measured with its own BN statistics (`released_frozen`).
            measure=lambda p, ctx=ctx: evaluate.accuracies(
                ctx.net, p, finetune.released_frozen(tuner, data, "fastntk", p, ctx.frozen, seed), data,
                batch_size=cfg.eval.batch_size))
        diag.update(entries)
      wd.atomic_write_json(diag_path, diag)
      return {"trainable": params}

    out = stages.array_stage(os.path.join(sdir, name), {"trainable": w0}, compute)
    models_of[name] = (out["trainable"], frozen_full)
    diagnostics[name] = stages.read_json(diag_path, {})
  tuner.release_shared()  # every method has run: the evaluation needs no statistics of D

  # The one place where released models are formed: with train-mode BN, each one's running
  # statistics from the data its method may see (D_r for Retrain and every method; D for Full).
  bn_notes = finetune.release_bn_stats(
      tuner, data, seed, sdir, models_of, measure=lambda p, fr: evaluate.accuracies(
          tuner.net, p, fr, data, batch_size=cfg.eval.batch_size))
  results = {}
  for name, (params, frozen) in models_of.items():
    def compute(name=name, params=params, frozen=frozen):
      m = evaluate.evaluate_method(tuner.net, params, frozen, data, cfg, seed, name, fit,
                                   train_streams)
      m["seconds"] = timings.get(name)  # None when this run restored the stage from disk
      return m
    results[name] = stages.json_stage(os.path.join(sdir, f"{name}.json"), compute)
    if diagnostics.get(name):
      results[name]["diagnostics"] = diagnostics[name]
    if name in bn_notes:
      results[name]["bn_recompute"] = {
          **bn_notes[name], "after": {k: results[name][k] for k in ("ua", "ra", "ta")}}
    faults.maybe_kill(f"seed{seed}/eval:{name}")

  # Distance of every method to Retrain (the golden baseline): parameters and predictions.
  extra = stages.json_stage(os.path.join(sdir, "vs_retrain.json"),
                            lambda: evaluate.distances_to_retrain(tuner.net, models_of, data,
                                                                  cfg, w0))
  for name, values in extra.items():
    results[name] = {**results[name], **values}
  return {"methods": results, "probes": _probes(setup, data, seed, w0, models_of, fit, sdir)}


def _shares_grams(cfg, tuner) -> bool:
  """Whether Fast-NTK takes its Gram statistics from the fine-tuning of the same seed: Full
  and Retrain linearised at w0 in closed form were solved from exactly the statistics the
  primal update needs, so the update reuses them (and counts their time as its own)."""
  return tuner.closed_form and cfg.unlearn.linearize_at == "init"


def _shares_kernel(cfg, tuner) -> bool:
  """Whether Fast-NTK takes D's kernel statistics from the fine-tuning of the same seed
  (linearised at w0 in the dual), as `_shares_grams` for the closed form."""
  return tuner.dual and cfg.unlearn.linearize_at == "init"


def _probes(setup: Setup, data, seed: int, w0, models_of: dict, fit, sdir: str) -> dict:
  """Linear probes of the pre-trained, a random and Fast-NTK's backbone."""
  model, cfg = setup.model, setup.cfg
  random_init = tr.init_variables(model, data.image_shape, seed=20_000 + seed)
  w_rand, frozen_rand = tr.split(random_init)
  inputs = {"pretrained": (w0, setup.frozen_pre), "random_init": (w_rand, frozen_rand)}
  if "fastntk" in models_of:  # the backbone as Fast-NTK left it (BN parameters), not f_lin
    params, frozen = models_of["fastntk"]
    inputs["fastntk"] = (params, {k: v for k, v in frozen.items()
                                  if k != tr.LINEARIZATION_POINT})
  probes = {}
  for kind, (params, frozen) in inputs.items():
    probes[kind] = stages.json_stage(
        os.path.join(sdir, f"probe_{kind}.json"),
        lambda params=params, frozen=frozen, kind=kind: evaluate.linear_probe(
            model, tr.fresh_head(params, model, data.image_shape, seed + 31), frozen, data,
            cfg, seed, kind, fit))
  return probes


def population_stage(setup: Setup, data) -> Optional[dict]:
  """The population of `eval.population_seeds` seeds (`experiment.population`) and its
  audits (KLoM, ε-score, U-LiRA); None when off."""
  pop = population.build(setup, data, population.Harness(
      method_context=method_context, frozen_of=frozen_of, make_fit=make_fit,
      fine_tuner=finetune.FineTuner, released_frozen=finetune.released_frozen))
  if pop is None:
    return None
  return population.audits(pop, data.forget.y)


def tuning_stage(setup: Setup, data) -> tuple[Any, dict]:
  """The fair tuning (`experiment.tuning`) of every method of `config.methods` with a search
  space, on the validation seed `tuning.seed` (its own Full and Retrain).

  Returns:
    (the config with every method's chosen point, {name: its search}); (cfg, {}) when
    `tuning.enabled` is False or no method has a space.
  """
  cfg = setup.cfg
  spaces = {m.name: methods_lib.search_space_of(cfg, m) for m in setup.methods}
  todo = [m for m in setup.methods if spaces[m.name]] if cfg.tuning.enabled else []
  if not todo:
    return cfg, {}
  seed = int(cfg.tuning.seed)
  seed_data = data_for_seed(cfg, data, seed, setup.model, tr.merge(setup.w_pre, setup.frozen_pre))
  lazy = {}

  def validation_models():
    # Full and Retrain of the validation seed, computed once and only when a search runs.
    if not lazy:
      log.info("tuning: Full and Retrain of the validation seed %d", seed)
      w0 = tr.fresh_head(setup.w_pre, setup.model, seed_data.image_shape, seed)
      tuner = finetune.FineTuner(cfg, setup.model, setup.frozen_pre, w0, seed_data, seed,
                                 forgetter=setup.forgetter, fit=make_fit(setup, data.num_classes),
                                 mesh=setup.mesh)
      full, _ = tuner.fit(seed_data.train, "full")
      retrain, _ = tuner.fit(seed_data.retain, "retrain")
      measure = lambda params, frozen: tuning.field_metrics(
          tuner.net, params, frozen, seed_data, batch_size=cfg.eval.batch_size,
          subsamples=int(cfg.tuning.mia_subsamples))
      # Every model measured as it would be released (`released_frozen`).
      lazy.update(w0=w0, tuner=tuner, full=full, measure=measure,
                  retrain=measure(retrain["trainable"], finetune.released_frozen(
                      tuner, seed_data, "retrain", retrain["trainable"],
                      frozen_of(tuner, retrain), seed)))
    return lazy

  searches = {}
  for method in todo:
    def compute(method=method):
      v = validation_models()

      def run_trial(trial_cfg):
        ctx = method_context(setup, v["tuner"], seed_data, seed, method, v["full"], v["w0"])
        if method.config_group == "unlearn":  # Fast-NTK: its Forgetter has the trial's options
          ctx = dataclasses.replace(ctx, forgetter=make_forgetter(
              trial_cfg, setup.model, setup.frozen_pre, data.num_classes))
        return method.run(ctx, methods_lib.block(trial_cfg, method))

      frozen_full = frozen_of(v["tuner"], v["full"])
      return tuning.search(cfg, method, spaces[method.name], run_trial=run_trial,
                           measure=lambda p: v["measure"](p, finetune.released_frozen(
                               v["tuner"], seed_data, method.name, p, frozen_full, seed)),
                           retrain=v["retrain"])
    searches[method.name] = tuning.run_stage(setup.workdir, method, compute)
    log.info("tuning %s: chose %s", method.name, searches[method.name]["chosen"])
  chosen = {name: s["chosen"] for name, s in searches.items()}
  return tuning.tuned_config(cfg, setup.methods, chosen), searches


def run(cfg: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True,
        prepared: Optional[Prepared] = None,
        on_ready: Optional[Callable[[], None]] = None) -> dict:
  """Runs (or resumes) the whole experiment in `workdir`; returns the results dict.

  Args:
    cfg: a config from `configs/` (validated here, every field, before any work).
    workdir: output folder; created if missing.
    show_progress: tqdm bars on stderr.
    prepared: `prepare(cfg)` when the caller checked the run already.
    on_ready: called once the workdir is held and claimed for this config, before any work
      (the command line starts its log there, so that a refused workdir logs nothing).

  Returns:
    The dict written to `workdir/results.json`.

  Raises:
    ValueError: a bad config field (named), a workdir of another config or in use.
  """
  with linalg.enable_x64(config_lib.solve_dtype(cfg) is not None):
    p = prepared or prepare(cfg)
    # The key that signs the deletion log: outside the workdir (refused inside it), created
    # on first use, before the workdir is touched.
    key = (signing.load_signing_key(signing.key_path(p.cfg.unlearn.signing_key),
                                    workdir=workdir)
           if "fastntk" in p.cfg.methods else None)
    with wd.hold(workdir, exclusive=jax.process_index() == 0):
      wd.claim(workdir, p.cfg, config_lib.base_config())
      if on_ready is not None:
        on_ready()
      for note in config_lib.ignored_fields(p.cfg):
        log.info("%s", note)
      log.info("data: %s", p.data.describe())
      return _run(p.cfg, workdir, p.data, p.model, p.plugins, p.mesh, show_progress, key)


def _run(cfg, workdir, data, model, plugins, mesh, show_progress, signing_key) -> dict:
  progress = progress_lib.Progress(workdir, show_progress)
  pretrained = pretrain.pretrain_stage(cfg, model, data, workdir, progress, mesh)
  w_pre, frozen_pre = tr.split(pretrained)
  data = resolve_forget_set(cfg, data, model, pretrained)  # subpopulation: D_f from features
  setup = Setup(cfg=cfg, workdir=workdir, model=model, frozen_pre=frozen_pre, w_pre=w_pre,
                forgetter=make_forgetter(cfg, model, frozen_pre, data.num_classes),
                methods=plugins, progress=progress, mesh=mesh, signing_key=signing_key)
  tuned, searches = tuning_stage(setup, data)
  if tuned is not cfg:  # every method with its chosen point (Fast-NTK's Forgetter too)
    setup = dataclasses.replace(setup, cfg=tuned, forgetter=make_forgetter(
        tuned, model, frozen_pre, data.num_classes))
    cfg = tuned
  per_seed, draws = {}, {}
  for seed in cfg.seeds:
    log.info("seed %d", seed)
    seed_data = data_for_seed(cfg, data, seed, model, pretrained)
    draws[seed] = data_draw(seed_data)
    per_seed[seed] = run_seed(setup, seed_data, seed)
  audits = population_stage(setup, data)
  progress.close()
  results = report.build_results(cfg, data, model, pretrained, per_seed)
  results["klom"] = audits and audits.pop("klom")
  if audits:  # the population's time differs between otherwise identical runs
    results["timing"]["population_seconds"] = audits.pop("seconds")
  results["population_audits"] = audits
  results["tuning"] = searches
  report.add_pretrain(results, pretrain.pretrain_info(workdir))
  # Which classes each seed ran on (with data.draw_per_seed, a draw per seed).
  results["data"]["per_seed"] = {str(s): d for s, d in draws.items()}
  report.write_all(results, workdir)
  return results
