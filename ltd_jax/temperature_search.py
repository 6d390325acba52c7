"""LTD's two-step teacher-temperature search (LTD paper, section 4.2), over the one train loop.

1. For each candidate T (``ltd.search_temperatures``), train a substitute model on clean data
   with the teacher's soft labels at T (method ``soft_label_natural``). T_max is the lowest T
   whose substitute's natural accuracy falls below ``ltd.search_accuracy_threshold``.
2. For each candidate T < T_max, train LTD with T_t = T; the chosen T minimises the LTD
   objective in its KL form over the last epoch of training: the loss less the soft labels'
   entropy H(p_T), KL(p_T || f(x)) + beta KL(f(x) || f(x_adv)). The cross-entropy form carries
   H(p_T), which grows with T whatever the student does, and would favour the lowest T. PGD-20
   accuracy is reported beside it.

Every candidate is an ordinary run in ``WORKDIR/search/...`` and resumes like one. The table
goes to ``temperature_search.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from ltd_jax import datasets
from ltd_jax import reports
from ltd_jax import teacher as teacher_lib


def _candidate_config(config, method: str, temperature: float, teacher_dir: str, epochs: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.method = method
  c.ltd.teacher_temperature = float(temperature)
  if c.teacher.source != 'torch':  # a trained teacher stage is shared by every candidate
    c.teacher.source, c.teacher.path = 'workdir', teacher_dir
  c.num_epochs = epochs
  if method == 'soft_label_natural':
    c.eval.during_training = ('clean',)
    c.eval.final = ('clean',)
    c.eval.selection = 'last'
  else:
    c.eval.final = ('clean', 'pgd20')
  return c


def _last_epoch_objective(workdir: str) -> float:
  """Mean over the last epoch's train records of the LTD loss in KL form (loss - H(p_T))."""
  records = [r for r in reports.read_metrics(workdir) if r['kind'] == 'train']
  last_epoch = int(np.ceil(records[-1]['epoch'])) - 1
  return float(np.mean([r['loss'] - r.get('teacher_entropy', 0.0) for r in records
                        if r['epoch'] > last_epoch]))


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)['attacks']


def ltd_temperature_search(config: ml_collections.ConfigDict, workdir: str, run) -> dict:
  """Runs the search with ``run(config, workdir)`` (train.train_and_evaluate); returns the table."""
  ds = datasets.load(config.data)
  teacher = teacher_lib.prepare_teacher(config, workdir, ds, run)
  epochs = config.ltd.search_epochs or config.num_epochs
  temps = sorted(float(t) for t in config.ltd.search_temperatures)
  rows = []
  t_max = float('inf')
  for t in temps:
    wd = os.path.join(workdir, 'search', f'substitute_T{t:g}')
    run(_candidate_config(config, 'soft_label_natural', t, teacher.workdir, epochs), wd)
    acc = _results(wd)['clean']['avg']
    rows.append({'T': t, 'step': 1, 'substitute_natural_acc': acc})
    if acc < config.ltd.search_accuracy_threshold:
      t_max = t
      break
  for t in [t for t in temps if t < t_max]:
    wd = os.path.join(workdir, 'search', f'ltd_T{t:g}')
    run(_candidate_config(config, 'ltd', t, teacher.workdir, epochs), wd)
    res = _results(wd)
    rows.append({'T': t, 'step': 2, 'ltd_loss': _last_epoch_objective(wd),
                 'clean': res['clean']['avg'],
                 'pgd20': res['pgd20']['avg'], 'pgd20_worst': res['pgd20']['worst']})
  step2 = [r for r in rows if r['step'] == 2]
  best = min(step2, key=lambda r: r['ltd_loss'])['T'] if step2 else None
  table = {'t_max': None if t_max == float('inf') else t_max, 'best_T': best,
           'threshold': config.ltd.search_accuracy_threshold, 'epochs': epochs, 'rows': rows}
  reports.write_json(os.path.join(workdir, 'temperature_search.json'), table)
  md = search_markdown(table)
  with open(os.path.join(workdir, 'temperature_search.md'), 'w') as f:
    f.write(md)
  print(md)
  return table


def search_markdown(table: dict) -> str:
  fmt = lambda v: '' if v is None else f'{100 * v:.2f}'
  lines = ['# LTD temperature search', '',
           f"Step 1 threshold: natural accuracy < {100 * table['threshold']:.1f}% -> "
           f"T_max = {table['t_max'] if table['t_max'] is not None else 'none (all candidates kept)'}; "
           f"step 2 choice (min LTD objective, KL form: loss - H(p_T)): T = {table['best_T']}; "
           f"{table['epochs']} epochs per model.", '',
           '| T | step | substitute natural acc % | LTD objective (KL form) | clean % | PGD-20 % '
           '| PGD-20 worst % |',
           '|---:|---:|---:|---:|---:|---:|---:|']
  for r in table['rows']:
    loss = f"{r['ltd_loss']:.4f}" if 'ltd_loss' in r else ''
    lines.append(f"| {r['T']:g} | {r['step']} | {fmt(r.get('substitute_natural_acc'))} | {loss} | "
                 f"{fmt(r.get('clean'))} | {fmt(r.get('pgd20'))} | {fmt(r.get('pgd20_worst'))} |")
  return '\n'.join(lines) + '\n'
