"""What every mode of a run shares: setup, checkpoint selection, restoring for evaluation and the
final evaluation (results.json / results.md, plots, report.md).

``train`` (the loop), ``export``, ``autoattack``, ``audit`` and ``temperature_search`` build on
this module; it never imports them.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from ltd_jax import checkpoints
from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import generated
from ltd_jax import interchange
from ltd_jax import methods
from ltd_jax import parallel
from ltd_jax import reports
from ltd_jax import weight_average
from ltd_jax.errors import CheckpointError, ConfigError
from ltd_jax.state import TrainState, build_model, create_train_state


def run_title(config) -> str:
  return f'{config.method} / {config.model.name} / {config.data.name}'


CHECKPOINT_CHOICES = ('auto', 'best', 'latest')
WEIGHT_SETS = ('', weight_average.EMA)


def parse_checkpoint(which: str) -> tuple[str, str]:
  """``'best:ema'`` -> ``('best', 'ema')``, ``'ema'`` -> ``('auto', 'ema')``, ``'latest'`` ->
  ``('latest', '')``; a PyTorch file -> ``(path, '')``."""
  if which == weight_average.EMA:
    return 'auto', weight_average.EMA
  base, sep, weights = which.rpartition(':')
  if sep and base in CHECKPOINT_CHOICES and weights in WEIGHT_SETS:
    return base, weights
  return which, ''


def is_torch_file(which: str) -> bool:
  """Whether a checkpoint choice names a PyTorch file rather than auto / best / latest (with an
  optional ``:ema``)."""
  return parse_checkpoint(which)[0] not in CHECKPOINT_CHOICES


def open_workdir(config, workdir: str) -> checkpoints.CheckpointStore:
  """The validated config's work directory, made if missing, and its checkpoint store."""
  config_lib.validate(config)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'cannot use {workdir} as the work directory ({e.strerror}): pass another '
                      f'--workdir') from e
  return checkpoints.CheckpointStore(workdir, config.checkpoint.keep)


def setup(config, workdir: str, store: checkpoints.CheckpointStore | None = None):
  """``(ds, initial state, store, steps_per_epoch)`` of a run in ``workdir`` (``store``: the one
  ``open_workdir`` already opened)."""
  store = store or open_workdir(config, workdir)
  try:
    ds = datasets.load(config.data)
    n = ds.num_train
    if config.batch_size > n:
      raise ConfigError(f'batch_size={config.batch_size} exceeds the {n} training images of '
                        f'{ds.name}: lower --config.batch_size')
    parallel.check_batch_size(config.batch_size, parallel.make_mesh())
    if config.optim.accumulation_steps > 1:
      parallel.check_batch_size(config.batch_size // config.optim.accumulation_steps,
                                parallel.make_mesh(), 'batch_size / optim.accumulation_steps')
    steps_per_epoch = (generated.steps_per_epoch(n, config.batch_size)
                       if getattr(ds, 'generated', None) is not None else n // config.batch_size)
    model = build_model(config, ds.num_classes)
    state = create_train_state(config, model, ds.image_shape, ds.num_classes, steps_per_epoch)
  except BaseException:
    store.close()
    raise
  return ds, state, store, steps_per_epoch


def restore_for_evaluation(config: ml_collections.ConfigDict, workdir: str, which: str = 'auto'):
  """``(ds, latest state, store)`` of a trained ``workdir``; for a PyTorch file (``which``) the
  work directory must not hold a run of its own, whose results the evaluation would replace.
  The checkpoints are looked for before the data is loaded: a wrong --workdir fails at once."""
  store = open_workdir(config, workdir)
  has_checkpoints = store.latest_step() is not None or store.best_step() is not None
  if is_torch_file(which):
    if has_checkpoints:
      store.close()
      raise ConfigError(f'{os.path.abspath(workdir)} holds a trained run: evaluate the PyTorch '
                        f'file {which} in another --workdir so that its results stay apart')
  elif not has_checkpoints:
    store.close()
    raise CheckpointError(f'no checkpoint in {os.path.abspath(workdir)}: train with --mode=train '
                          f'first or pass the --workdir of a trained run')
  ds, state, store, _ = setup(config, workdir, store)
  if is_torch_file(which):
    return ds, state, store
  try:
    latest = store.restore(state, 'latest')
  except CheckpointError:
    store.close()
    raise
  return ds, latest if latest is not None else state, store


def select_checkpoint(config, state: TrainState, store: checkpoints.CheckpointStore,
                      which: str = 'auto') -> tuple[TrainState, str]:
  """The state to evaluate or export and its label.

  ``which``: ``best`` (selected by ``eval.selection`` on ``eval.selection_split``), ``latest``
  (``state`` itself, already the latest), ``auto`` (best when a best checkpoint exists and
  selection is not ``last``), each with an optional ``:ema`` (the EMA's own best checkpoint and
  the EMA weights, ``weight_average``), or the path of a PyTorch ``.pt``/``.pth``/
  ``.safetensors`` file whose weights are imported into ``state``.
  """
  if is_torch_file(which):
    sd = interchange.load_torch_file(which)
    params, batch_stats = interchange.from_torch_state_dict(
        sd, state.params, state.batch_stats, source=which, model_name=config.model.name)
    return state.replace(params=params, batch_stats=batch_stats), os.path.abspath(which)
  which, weights = parse_checkpoint(which)
  deployed(config, state, weights)  # refuses :ema for a run without one before any restore
  store.wait()
  auto = which == 'auto'
  if auto:
    which = ('best' if config.eval.selection != 'last' and store.best_step(weights) is not None
             else 'latest')
  if which == 'best':
    restored = store.restore(state, 'best', name=weights)
    if restored is not None:
      state = restored
    elif auto:  # the best one was corrupt (and reported): the latest is what is left
      which = 'latest'
    else:
      folder = 'best' if not weights else f'best_{weights}'
      raise CheckpointError(f'no best checkpoint in {os.path.join(store.workdir, folder)}: train '
                            f'first or evaluate with --checkpoint=latest')
  return deployed(config, state, weights), which + (f':{weights}' if weights else '')


def deployed(config, state: TrainState, weights: str = '') -> TrainState:
  """``state`` with the weights its method is evaluated and exported with: a weight average it
  keeps (CFA's FAWA), the EMA for ``weights='ema'``, else unchanged."""
  method = methods.get_method(config.method)
  variables = weight_average.deployed_variables(method, config, state, weights)
  if not weights and weight_average.rule(method, config) != 'fawa':
    return state
  return weight_average.with_weights(state, variables)


def final_evaluation(config, workdir: str, state: TrainState, ds: data.Dataset,
                     store: checkpoints.CheckpointStore, which: str = 'auto',
                     trained_steps: int | None = None) -> dict:
  """Full evaluation of the checkpoint ``which`` (see ``select_checkpoint``) on the test split
  with the ``eval.final`` attacks; a run keeping an EMA also evaluates the EMA's checkpoint
  (``WHICH:ema``), under ``results['ema']`` (its rows in the table). Writes results.json/md and
  the plots."""
  latest = state
  state, which = select_checkpoint(config, state, store, which)
  imported = is_torch_file(which)
  if imported:
    selection, trained_steps = None, None
  else:
    selection = config.eval.selection if which.startswith('best') else 'last'
    trained_steps = int(state.step) if trained_steps is None else trained_steps
  images, labels = ds.split('test')
  subset = evaluate.stratified_subset(labels, config.eval.final_subset_size, config.seed)
  images, labels = images[subset], labels[subset]
  mesh = parallel.make_mesh()
  parallel.connect_hosts(mesh)
  eval_step = evaluate.make_eval_step(state.apply_fn, config.eval.final,
                                      eps=config_lib.eval_eps(config), eval_config=config.eval,
                                      platform=parallel.platform(mesh))
  results = {
      'title': run_title(config), 'checkpoint': which,
      'step': None if imported else int(state.step), 'split': 'test',
      'num_examples': int(len(labels)), 'eps': config_lib.eval_eps(config),
      'train_eps': float(config.eps), 'selection': selection,
      'selection_split': config.eval.selection_split, 'trained_steps': trained_steps,
      'attacks': _test_attacks(config, eval_step, state, images, labels, ds.num_classes),
      'class_names': list(ds.class_names),
  }
  method = methods.get_method(config.method)
  if (not imported and not parse_checkpoint(which)[1]
      and weight_average.rule(method, config) == weight_average.EMA):
    ema_state, ema_which = select_checkpoint(config, latest, store,
                                             f'{parse_checkpoint(which)[0]}:ema')
    results['ema'] = {'checkpoint': ema_which, 'step': int(ema_state.step),
                      'attacks': _test_attacks(config, eval_step, ema_state, images, labels,
                                               ds.num_classes)}
  if parallel.is_primary():
    md = reports.write_results(workdir, results, ds.class_names)
    if config.report.get('plots', True):
      reports.plot_per_class(workdir, results, ds.class_names, comparison_runs(config, workdir))
      reports.plot_training_curves(workdir)
      for spec in method.plots:
        reports.plot_class_series(workdir, spec, ds.class_names)
    reports.write_report(workdir)
    print(md)
  return results


def _test_attacks(config, eval_step, state: TrainState, images, labels, num_classes: int) -> dict:
  """The ``eval.final`` attacks (``eval_step``) on the test images, per attack and class."""
  mesh = parallel.make_mesh()
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  return evaluate.evaluate(eval_step, parallel.replicate(state.variables, mesh), images, labels,
                           num_classes, config.eval.batch_size, rng, mesh=mesh)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = 'auto') -> dict:
  """``--mode=evaluate``: final evaluation of a saved checkpoint of ``workdir``, or of a PyTorch
  file (``which``) imported into ``config.model``."""
  ds, state, store = restore_for_evaluation(config, workdir, which)
  try:
    if is_torch_file(which):
      reports.write_run_info(workdir, config)
    return final_evaluation(config, workdir, state, ds, store, which,
                            trained_steps=int(state.step))
  finally:
    store.close()


def comparison_runs(config, workdir: str) -> dict:
  """Finished runs to plot beside this one: its teacher and ``report.baseline_workdir``."""
  runs = {'teacher': {'train': os.path.join(workdir, 'teacher'), 'workdir': config.teacher.path,
                      'torch': '', 'none': ''}[config.teacher.source],
          'baseline': config.report.baseline_workdir}
  out = {}
  for name, path in runs.items():
    results_path = os.path.join(path, 'results.json') if path else ''
    if results_path and os.path.exists(results_path):
      with open(results_path) as f:
        out[name] = json.load(f)
  return out


def trained_steps_in_results(workdir: str) -> int | None:
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      return int(json.load(f)['trained_steps'])
  except (OSError, ValueError, KeyError, TypeError):
    return None
