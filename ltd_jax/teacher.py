"""Frozen teachers for distillation: from a work directory of this project, or trained first.

``teacher.source``:
  * ``workdir``: ``teacher.path`` is a finished (or at least checkpointed) run of this project;
    its ``config.json`` says the architecture.
  * ``train``: the teacher stage runs ``teacher.config`` (e.g. ``configs/natural_digits.py`` for
    LTD, a TRADES config for RSLAD / ABSLD) in ``WORKDIR/teacher`` with the student's data and
    seed, resuming or skipping it when already complete, before the student trains.
  * ``torch``: ``teacher.path`` is a PyTorch checkpoint (``.pt``/``.pth``/``.safetensors``, e.g.
    TRADES' released WRN-34-10) of the architecture ``teacher.model.name`` (or the one named by
    the ``model.json`` that ``--mode=export`` writes beside it), imported into Flax.
The teacher is only ever applied in eval mode and never updated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ltd_jax import checkpoints
from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import interchange
from ltd_jax import methods
from ltd_jax import models
from ltd_jax import state as state_lib
from ltd_jax import weight_average
from ltd_jax.errors import CheckpointError, ConfigError



@dataclasses.dataclass
class Teacher:
  apply_fn: Callable[..., Any]
  variables: Any
  config: ml_collections.ConfigDict
  workdir: str
  step: int

  def results(self) -> dict | None:
    path = os.path.join(self.workdir, 'results.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)


def teacher_stage_config(config: ml_collections.ConfigDict,
                         section: str = 'teacher') -> ml_collections.ConfigDict:
  """The teacher stage's config: ``teacher.config`` (or ``init.config``, the warm-start stage)
  with the student's data, seed and display."""
  spec = config[section].config
  try:
    tc = config_lib.load_config_file(spec)
  except ConfigError as e:
    raise ConfigError(f'{section}.config {spec}: {e}') from e
  if tc.teacher.source != 'none':
    raise ConfigError(f'{section}.config {spec} itself needs a teacher: '
                      f'a {section} stage must train without one')
  tc.data = ml_collections.ConfigDict(config.data.to_dict())
  tc.seed = config.seed
  tc.progress_bar = config.progress_bar
  return tc


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'teacher work directory {workdir} has no config.json: pass the '
                          f'--config.teacher.path of a run of this project')
  config = config_lib.default_config()
  with open(path) as f:
    _merge(config, json.load(f))  # keys a newer version added keep their defaults
  return config


def _merge(config: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if key not in config:
      continue
    if isinstance(value, dict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def load_teacher(workdir: str, num_classes: int, image_shape, which: str = 'auto') -> Teacher:
  """Restores the teacher of ``workdir`` (its best checkpoint if kept, else the latest;
  ``WHICH:ema`` the EMA's best checkpoint and its EMA weights)."""
  tc = load_workdir_config(workdir)
  which, weights = _parse_checkpoint(which)
  model = state_lib.build_model(tc, num_classes)
  template = state_lib.create_train_state(tc, model, image_shape, num_classes, steps_per_epoch=1)
  store = checkpoints.CheckpointStore(workdir, keep=tc.checkpoint.keep)
  try:
    restored = None
    if which == 'auto' and tc.eval.selection != 'last' and store.best_step(weights) is not None:
      restored = store.restore(template, 'best', name=weights)  # None if corrupt: the latest
    if restored is None:
      which = 'latest' if which == 'auto' else which
      restored = store.restore(template, which, name=weights)
  finally:
    store.close()
  if restored is None:
    raise CheckpointError(f'no {which} checkpoint of the teacher in {os.path.abspath(workdir)}: '
                          f'train it first or point --config.teacher.path at a trained run')
  method = methods.METHODS.get(tc.method)  # a method its config registered may be unknown here
  variables = (restored.variables if method is None  # CFA: its FAWA average; :ema its EMA
               else weight_average.deployed_variables(method, tc, restored, weights))
  return Teacher(model.apply, variables, tc, workdir, int(restored.step))


def _parse_checkpoint(which: str) -> tuple[str, str]:
  """``auto|best|latest[:ema]`` -> ``(choice, weights)`` (``runs.parse_checkpoint``'s form)."""
  base, sep, weights = which.partition(':')
  return (base, weights) if sep else (which, '')


def torch_teacher_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``teacher.model``, or the ``model`` entry of ``model.json`` beside ``teacher.path``."""
  if config.teacher.model.name:
    return config.teacher.model
  info_path = os.path.join(os.path.dirname(os.path.abspath(config.teacher.path)), 'model.json')
  if not os.path.exists(info_path):
    raise ConfigError(f'teacher.source=torch: name the architecture of {config.teacher.path} with '
                      f'--config.teacher.model.name (e.g. wrn-34-10); no {info_path} says it')
  with open(info_path) as f:
    return ml_collections.ConfigDict(json.load(f)['model'])


def torch_teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that builds the architecture of the PyTorch teacher ``teacher.path``."""
  tc = config_lib.default_config()
  tc.model.update(torch_teacher_model(config).to_dict())
  tc.data = ml_collections.ConfigDict(config.data.to_dict())
  return tc


def teacher_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose ``model`` and ``dtype`` build the configured teacher (its stage's config
  for ``source=train``), read without loading any weights (``--mode=compile``)."""
  source = config.teacher.source
  if source == 'train':
    return teacher_stage_config(config)
  if source == 'workdir':
    return load_workdir_config(config.teacher.path)
  if source == 'torch':
    return torch_teacher_config(config)
  raise ConfigError(f'method {config.method} has no teacher: set --config.teacher.source')


def load_torch_teacher(config: ml_collections.ConfigDict, ds: data.Dataset) -> Teacher:
  """A frozen teacher from the PyTorch checkpoint ``teacher.path``."""
  tc = torch_teacher_config(config)
  model = state_lib.build_model(tc, ds.num_classes)
  params, batch_stats = jax.eval_shape(  # shapes only: every value comes from the file
      lambda r: models.init_variables(model, r, ds.image_shape), jax.random.PRNGKey(0))
  state_dict = interchange.load_torch_file(config.teacher.path)
  params, batch_stats = interchange.from_torch_state_dict(
      state_dict, params, batch_stats, source=config.teacher.path,
      model_name=f'the teacher model {tc.model.name} with {ds.num_classes} classes')
  return Teacher(model.apply, {'params': params, 'batch_stats': batch_stats}, tc,
                 os.path.dirname(os.path.abspath(config.teacher.path)), step=0)


def prepare_teacher(config: ml_collections.ConfigDict, workdir: str, ds: data.Dataset,
                    run_stage: Callable[[ml_collections.ConfigDict, str], Any]) -> Teacher | None:
  """Trains (``source=train``, via ``run_stage``) and/or loads the configured teacher."""
  source = config.teacher.source
  if source == 'none':
    return None
  if source == 'torch':
    return load_torch_teacher(config, ds)
  if source == 'train':
    teacher_dir = os.path.join(workdir, 'teacher')
    tc = teacher_stage_config(config)
    run_stage(tc, teacher_dir)  # resumes, or returns at once when already complete
  else:
    teacher_dir = config.teacher.path
    tc = load_workdir_config(teacher_dir)
  if tc.data.name != ds.name:
    raise ConfigError(f'the teacher in {teacher_dir} was trained on {tc.data.name}, the student '
                      f'trains on {ds.name}: use a teacher of the same dataset')
  return load_teacher(teacher_dir, ds.num_classes, ds.image_shape, config.teacher.checkpoint)


def warm_start_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the warm start's run lives: WORKDIR/init (``init.source=train``) or ``init.path``."""
  return os.path.join(workdir, 'init') if config.init.source == 'train' else config.init.path


def warm_start_variables(config: ml_collections.ConfigDict, workdir: str, ds: data.Dataset,
                         run_stage: Callable[[ml_collections.ConfigDict, str], Any]):
  """The weights a warm-started student begins from (``init``): the stage ``init.config`` trained
  (or resumed, or found complete) in WORKDIR/init, or the run ``init.path``; its best checkpoint
  by default (``init.checkpoint``)."""
  directory = warm_start_dir(config, workdir)
  if config.init.source == 'train':
    run_stage(teacher_stage_config(config, 'init'), directory)
  elif load_workdir_config(directory).data.name != ds.name:
    raise ConfigError(f'the warm start {directory} was trained on another dataset than {ds.name}')
  return load_teacher(directory, ds.num_classes, ds.image_shape, config.init.checkpoint).variables


def precompute_logits(teacher: Teacher, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
  """The teacher's eval-mode logits on every (un-augmented) image: the soft-label cache."""
  apply = jax.jit(lambda v, x: teacher.apply_fn(v, data.to_float(x), train=False))
  out = [np.asarray(apply(teacher.variables, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.float32)
