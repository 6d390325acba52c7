"""What a run leaves in its work directory: config, environment, metrics, results tables, plots."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from ltd_jax import methods

LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'tensorboardX',
             'numpy', 'scikit-learn', 'tensorflow-datasets', 'tqdm', 'matplotlib', 'safetensors',
             'torch', 'pyautoattack')


def git_commit() -> str:
  """The commit of the ltd_jax checkout (with ``-dirty`` when it has local changes), or 'unknown'."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    return commit + ('-dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def environment() -> dict:
  versions = {}
  for lib in LIBRARIES:
    try:
      versions[lib] = importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
      versions[lib] = None
  return {
      'git_commit': git_commit(),
      'python': sys.version.split()[0],
      'platform': platform.platform(),
      'argv': sys.argv,
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'libraries': versions,
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'devices': [str(d) for d in jax.devices()],
      'device_kind': jax.devices()[0].device_kind,
  }


def write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.generic,)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_run_info(workdir: str, config) -> None:
  """``config.json`` and ``environment.json`` (git commit, library versions, devices)."""
  write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  write_json(os.path.join(workdir, 'environment.json'), environment())


class MetricWriter:
  """Appends one JSON object per line to ``metrics.jsonl`` (the source of truth; lines of earlier,
  resumed runs are kept) and the same values to TensorBoard event files in ``tensorboard/``
  (tensorboardX: no TensorFlow): scalar ``KIND/KEY`` for each number, ``KIND/KEY/CLASS`` for
  each entry of a per-class list (ABSLD's temperatures, per-class accuracies)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._board = None

  def write(self, kind: str, step: int, **values) -> None:
    record = {'kind': kind, 'step': int(step), 'time': time.time()}
    record.update({k: _scalar(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, default=_json_default) + '\n')
    self._write_board(record)

  def _write_board(self, record: dict) -> None:
    if self._board is None:
      # A resumed run appends a new file: the suffix keeps two in one second apart.
      self._board = summary_writer_class()(self.tensorboard_dir, flush_secs=30,
                                           filename_suffix=f'.{time.time_ns()}')
    kind, step, wall = record['kind'], record['step'], record['time']
    number = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
    for key, value in record.items():
      if key in ('kind', 'step', 'time'):
        continue
      per_class = isinstance(value, (list, tuple, np.ndarray))
      for c, v in enumerate(value if per_class else [value]):
        if number(v):
          tag = f'{kind}/{key}' + (f'/{c}' if per_class else '')
          self._board.add_scalar(tag, float(v), step, walltime=wall)
    self._board.flush()

  def close(self) -> None:
    if self._board is not None:
      self._board.close()
      self._board = None


def summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported without PyTorch where the process has not loaded
  it: tensorboardX imports torch (seconds of every run's start) only so that it can take torch
  tensors, and ``MetricWriter`` gives it Python floats. While it is imported, ``import torch``
  raises ImportError, which tensorboardX catches; torch imports as usual afterwards."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # an import of a None entry raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class NullWriter:
  """The MetricWriter of processes other than the first: records nothing."""

  def write(self, kind: str, step: int, **values) -> None:
    del kind, step, values

  def close(self) -> None:
    pass


def _scalar(v):
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
    return float(v)
  return v


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``metrics.jsonl``; a line cut short by a killed process is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def rewind_metrics(workdir: str, step: int) -> None:
  """Drops the records after ``step`` (the checkpoint a run resumes from): a killed run logged
  steps that the resumed run trains again, and each must appear once in the curves."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(workdir) if int(r.get('step', 0)) <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r, default=_json_default) + '\n' for r in kept)
  os.replace(tmp, path)


SUMMARY_KEYS = ('avg', 'worst', 'worst10', 'nsd')


def results_markdown(results: dict, class_names=()) -> str:
  """Summary table (attacks as rows) and per-class table (classes as rows) in Markdown; a run
  with an EMA (``results['ema']``) has a row (and a column) ``ATTACK (EMA)`` for each of its
  attacks too."""
  evals = dict(results['attacks'])
  ema = results.get('ema')
  if ema:
    evals.update({f'{name} (EMA)': r for name, r in ema['attacks'].items()})
  names = list(evals)
  n = results.get('num_examples', '?')
  where = 'imported' if results.get('step') is None else f"step {results['step']}"
  lines = [f"# Results: {results.get('title', '')}".rstrip(), '',
           f"Checkpoint: {results.get('checkpoint', '?')} ({where}), "
           f"split: {results.get('split', 'test')} ({n} images), "
           f"eps = {results.get('eps', float('nan')):.5f}"
           + (f" (trained at {results['train_eps']:.5f})"
              if results.get('train_eps', results.get('eps')) != results.get('eps') else ''), '',
           '| attack | images | avg % | worst-class % | worst-10% % | NSD |',
           '|---|---:|---:|---:|---:|---:|']
  for name in names:
    r = evals[name]
    lines.append(f"| {name} | {r.get('num_examples', n)} | {100 * r['avg']:.2f} | "
                 f"{100 * r['worst']:.2f} | {100 * r['worst10']:.2f} | {r['nsd']:.3f} |")
  if ema:
    lines += ['', f"(EMA): the exponential moving average of the weights, checkpoint "
              f"{ema['checkpoint']} (step {ema['step']})."]
  for entry, label in ((results, 'autoattack'), (ema or {}, 'autoattack (EMA)')):
    if 'autoattack' in entry:
      aa = entry['autoattack']
      lines += ['', f"{label}: the official AutoAttack (pyautoattack {aa['pyautoattack']}, "
                f"version {aa['version']}: {', '.join(aa['attacks'])}) on the exported PyTorch "
                f"model, {aa['num_examples']} images, device {aa['device']}, "
                f"{aa['seconds']:.0f} s."]
  num_classes = len(evals[names[0]]['per_class']) if names else 0
  class_names = (list(class_names) or list(results.get('class_names', ()))
                 or [str(i) for i in range(num_classes)])
  lines += ['', '| class | ' + ' | '.join(f'{n} %' for n in names) + ' |',
            '|---|' + '---:|' * len(names)]
  for c in range(num_classes):
    cells = ' | '.join(f"{100 * evals[n]['per_class'][c]:.1f}" for n in names)
    lines.append(f'| {class_names[c]} | {cells} |')
  return '\n'.join(lines) + '\n'


def write_results(workdir: str, results: dict, class_names=(), stem: str = 'results') -> str:
  """Writes ``{stem}.json`` and ``{stem}.md``; returns the Markdown."""
  write_json(os.path.join(workdir, f'{stem}.json'), results)
  md = results_markdown(results, class_names)
  with open(os.path.join(workdir, f'{stem}.md'), 'w') as f:
    f.write(md)
  return md


def plot_training_curves(workdir: str) -> str | None:
  """``training_curves.png``: train loss and lr, train/eval accuracy against step."""
  records = read_metrics(workdir)
  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  if not train:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot([r['step'] for r in train], [r['loss'] for r in train])
  axes[0].set(xlabel='step', ylabel='train loss', title='loss and lr')
  lr = [(r['step'], r['lr']) for r in train if 'lr' in r]
  if lr:
    twin = axes[0].twinx()
    twin.plot(*zip(*lr), color='gray', linestyle='--', linewidth=1)
    twin.set(ylabel='lr (dashed)', yscale='log')
  for key in ('acc_clean', 'acc_adv'):
    pts = [(r['step'], r[key]) for r in train if key in r]
    if pts:
      axes[1].plot(*zip(*pts), label=f'train {key[4:]}', alpha=0.6)
  for key in sorted({k for r in evals for k in r if k.endswith('/avg')}):
    pts = [(r['step'], r[key]) for r in evals if key in r]
    axes[1].plot(*zip(*pts), marker='o', label=f"eval {key.split('/')[0]}")
  axes[1].set(xlabel='step', ylabel='accuracy', title='accuracy', ylim=(0, 1))
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, 'training_curves.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_per_class(workdir: str, results: dict, class_names=(), others: dict | None = None,
                   name: str = 'per_class_accuracy.png') -> str:
  """Bar chart of per-class accuracy for every attack; ``others`` adds labelled runs beside it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = {'this run': results, **(others or {})}
  attacks = list(results['attacks'])
  num_classes = len(results['attacks'][attacks[0]]['per_class'])
  labels = list(class_names) or [str(i) for i in range(num_classes)]
  fig, axes = plt.subplots(len(attacks), 1, figsize=(max(6, 0.5 * num_classes), 2.4 * len(attacks)),
                           squeeze=False)
  width = 0.8 / len(runs)
  for ax, attack in zip(axes[:, 0], attacks):
    for j, (run_name, run) in enumerate(runs.items()):
      if attack in run['attacks']:
        acc = run['attacks'][attack]['per_class']
        ax.bar(np.arange(num_classes) + j * width, acc, width, label=run_name)
    ax.set(ylabel='accuracy', title=attack, ylim=(0, 1))
    ax.set_xticks(np.arange(num_classes) + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=45 if num_classes > 10 else 0, fontsize=8)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_class_series(workdir: str, spec, class_names=()) -> str | None:
  """``spec.file`` (a ``methods.PlotSpec``): one panel per series, one curve per class over the
  epochs of the ``spec.kind`` records in metrics.jsonl; None when there are none."""
  records = [r for r in read_metrics(workdir) if r['kind'] == spec.kind]
  if not records:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  epochs = [r['epoch'] for r in records]
  num_classes = len(records[0][spec.series[0][0]])
  names = list(class_names) or [str(i) for i in range(num_classes)]
  fig, axes = plt.subplots(1, len(spec.series), figsize=(5.5 * len(spec.series), 4), sharey=True,
                           squeeze=False)
  for ax, (key, title) in zip(axes[0], spec.series):
    values = np.array([r[key] for r in records])
    for c in range(num_classes):
      ax.plot(epochs, values[:, c], lw=1.5 if num_classes <= 10 else 0.6, label=names[c])
    ax.set(xlabel='epoch', title=title)
  axes[0, 0].set_ylabel(spec.ylabel)
  if num_classes <= 20:
    axes[0, -1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, spec.file)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


PLOTS = (('training_curves.png', 'Training curves'),
         ('per_class_accuracy.png', 'Per-class accuracy'))


def _method_plots(method_name) -> list[tuple[str, str]]:
  try:
    return [(p.file, p.title) for p in methods.get_method(method_name).plots]
  except ValueError:
    return []


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_report(workdir: str, status: str | None = None) -> str:
  """``report.md``: the run's status, results table for every attack (AutoAttack included
  when it ran), audit verdict, plots, training summary, environment and full config.
  ``status`` overrides the one read from the work directory (finished when results exist)."""
  config = _read_json(os.path.join(workdir, 'config.json')) or {}
  env = _read_json(os.path.join(workdir, 'environment.json')) or {}
  results = _read_json(os.path.join(workdir, 'results.json'))
  audit = _read_json(os.path.join(workdir, 'audit.json'))
  title = (results or {}).get('title') or (
      f"{config.get('method', '?')} / {config.get('model', {}).get('name', '?')} / "
      f"{config.get('data', {}).get('name', '?')}")
  status = status or ('finished' if results else 'no results yet')
  lines = [f'# Run report: {title}', '', f'Status: {status}  ',
           f'Work directory: `{os.path.abspath(workdir)}`  ',
           f"Written: {time.strftime('%Y-%m-%d %H:%M:%S')}", '']
  lines += ['## Results', '']
  if results:
    table = results_markdown(results).split('\n', 2)[2]  # without its own title line
    lines += [table.rstrip(), '']
  else:
    lines += ['No final evaluation yet.', '']
  lines += ['## Gradient-masking audit', '']
  if audit:
    lines += [f"Checkpoint {audit.get('checkpoint', '?')}, {audit['num_examples']} images. "
              f"**{audit['verdict']}** (details in `audit.md`)", '',
              '| check | verdict | evidence |', '|---|---|---|']
    lines += [f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} | {c['evidence']} |"
              for c in audit['checks']]
    lines.append('')
  else:
    lines += ['Not run: `python run.py --config=... --mode=audit`.', '']
  plots = [(f, t) for f, t in (*PLOTS, *_method_plots(config.get('method')))
           if os.path.exists(os.path.join(workdir, f))]
  if plots:
    lines += ['## Plots', ''] + [f'![{t}]({f})' for f, t in plots] + ['']
  train = [r for r in read_metrics(workdir) if r['kind'] == 'train']
  if train:
    last = train[-1]
    lines += ['## Training', '',
              f"{last['step']} steps logged, last loss {last['loss']:.4g}"
              + (f", last train adversarial accuracy {100 * last['acc_adv']:.2f}%"
                 if 'acc_adv' in last else '')
              + f", {last.get('images_per_sec', float('nan')):.1f} images/s.", '']
  if env:
    libs = ', '.join(f'{k} {v}' for k, v in env.get('libraries', {}).items() if v)
    lines += ['## Environment', '',
              f"- git commit: `{env.get('git_commit')}`",
              f"- python {env.get('python')} on {env.get('platform')}",
              f"- devices: {env.get('device_count')} x {env.get('device_kind')} "
              f"({env.get('process_count')} process(es))",
              f'- libraries: {libs}',
              f"- command: `{' '.join(env.get('argv', []))}`", '']
  lines += ['## Config', '', '```json', json.dumps(config, indent=2, default=_json_default),
            '```', '']
  text = '\n'.join(lines)
  tmp = os.path.join(workdir, 'report.md.tmp')
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, 'report.md'))
  return text
