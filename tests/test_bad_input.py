"""Bad input, case by case: each gives one line on stderr naming the problem and the fix, and a
non-zero exit, before anything is lost.

The command line runs in this process (``conftest.run_in_process``) with file-descriptor capture, so each case costs milliseconds, not a JAX start-up.
tests/test_cli.py runs some of them as real subprocesses; the batch that does not divide over
8 devices is in tests/test_parallel.py (the device count is fixed when JAX starts).
"""

import os
import pickle
import sys

import numpy as np
import pytest

from ltd_jax import interchange
from ltd_jax import state as state_lib
from tests.conftest import make_tiny_config, run_in_process


def _cifar_dir(root, labels=(0, 1, 2, 3), evil=False, truncate=False):
  folder = root / 'cifar-10-batches-py'
  folder.mkdir(parents=True)

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {root / "pwned"}',))

  for name in ('data_batch_1', 'test_batch'):
    obj = {b'data': Evil() if evil else np.zeros((4, 3072), np.uint8), b'labels': list(labels)}
    blob = pickle.dumps(obj)
    (folder / name).write_bytes(blob[:len(blob) // 2] if truncate else blob)
  return str(root)


def _torch_file(path, width):
  """A PyTorch state_dict of the digits small CNN of ``width`` (random weights)."""
  config = make_tiny_config()
  config.model.width = width
  model = state_lib.build_model(config, 10)
  state = state_lib.create_train_state(config, model, (8, 8, 1), 10, 1)
  import torch  # pylint: disable=g-import-not-at-top
  sd = interchange.to_torch_state_dict(state.params, state.batch_stats)
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, str(path))
  return str(path)


DIGITS = '--config=configs/trades_digits.py'
CIFAR = '--config=configs/trades_cifar10.py'

# (case id, arguments after the work directory's, text the error line must contain). Arguments
# may use {tmp}, a fresh directory, and {cifar...}/{torch...} files made by SETUP below.
CASES = [
    ('mistyped key', [DIGITS, '--config.optim.learning_rate=0.1'],
     "unknown config key 'optim.learning_rate' in --config.optim.learning_rate=0.1: did you mean "
     "--config.optim.lr?"),
    ('mistyped section', [DIGITS, '--config.absdl.tau_min=1'], 'did you mean --config.absld.tau_min'),
    ('no config flag', ['--config.eps=0.1'], 'no config: pass --config=NAME'),
    ('unknown config name', ['--config=absld_digit'], "unknown config 'absld_digit': did you mean absld_digits?"),
    ('missing config file', ['--config=configs/absld_cifar_10.py'],
     'configs/absld_cifar_10.py not found'),
    ('config file that fails', ['--config={tmp}/broken.py'], 'broken.py failed to load'),
    ('value of the wrong type', [DIGITS, '--config.eps=big'], "--config.eps=big: could not convert"),
    ('float for an int', [DIGITS, '--config.batch_size=1.5'], '--config.batch_size=1.5: invalid literal'),
    ('unknown mode', [DIGITS, '--mode=attack'], 'flag --mode=attack: value should be one of'),
    ('negative eps', [DIGITS, '--config.eps=-0.1'], 'eps must be >= 0'),
    ('eps in pixel units', [DIGITS, '--config.eps=8'], 'did you mean 8/255'),
    ('evaluation eps in pixel units', [DIGITS, '--config.eval.eps=8'], 'eval.eps=8.0 is not in [0, 1]'),
    ('tau_min > tau_max', [DIGITS, '--config.absld.tau_min=3', '--config.absld.tau_max=2'],
     'absld.tau_min (3.0) must be > 0 and <= absld.tau_max (2.0)'),
    ('tau_init outside the bounds', [DIGITS, '--config.absld.tau_init=9'],
     'absld.tau_init (9.0) must lie in'),
    ('unknown method', [DIGITS, '--config.method=fgsm_at'], 'unknown method'),
    ('unknown model', [DIGITS, '--config.model.name=vgg16'], 'unknown model'),
    ('unknown dtype', [DIGITS, '--config.dtype=float16'], 'dtype must be float32 or bfloat16'),
    ('zero learning rate', [DIGITS, '--config.optim.lr=0'], 'optim.lr must be > 0'),
    ('decreasing lr milestones', [DIGITS, '--config.optim.lr_boundaries_epochs=(5,2)'],
     'increasing'),
    ('unknown evaluation attack', [DIGITS, '--config.eval.final=("clean","apgd")'],
     "unknown attacks ['apgd']"),
    ('unknown attack init', [DIGITS, '--config.attack.init=gaussian'], 'attack.init must be'),
    ('validation split without one', [DIGITS, '--config.eval.selection_split=val'],
     'set --config.data.val_size=N'),
    ('validation split too large', [DIGITS, '--config.data.val_size=5000',
                                    '--config.eval.selection_split=val'],
     'data.val_size=5000 must be smaller'),
    ('batch larger than the dataset', [DIGITS, '--config.batch_size=5000'],
     'batch_size=5000 exceeds'),
    ('negative epochs', [DIGITS, '--config.num_epochs=-1'], 'num_epochs must be >= 0'),
    ('no checkpoint to keep', [DIGITS, '--config.checkpoint.keep=0'], 'checkpoint.keep must be > 0'),
    ('distillation without a teacher', [DIGITS, '--config.method=absld'],
     'distils from a teacher: set --config.teacher.source'),
    ('fairness method without a validation split', [DIGITS, '--config.method=cfa'],
     'method cfa adapts to a held-out validation split: set --config.data.val_size'),
    ('FRL without a validation split', [DIGITS, '--config.method=frl'],
     'method frl adapts to a held-out validation split'),
    ('AdaAD without a teacher', [DIGITS, '--config.method=adaad'],
     'method adaad distils from a teacher'),
    ('AdaAD with cached teacher logits', [DIGITS, '--config.method=adaad',
                                          '--config.teacher.source=train',
                                          '--config.teacher.config=configs/trades_digits.py',
                                          '--config.teacher.cache_logits=True'],
     'runs the teacher on the images its attack makes'),
    ('warm start without its stage', [DIGITS, '--config.init.source=train'],
     'init.source=train needs --config.init.config'),
    ('teacher work directory that is not one', [DIGITS, '--config.method=rslad',
                                                '--config.teacher.source=workdir',
                                                '--config.teacher.path={tmp}'],
     'has no config.json'),
    ('teacher checkpoint of another architecture',
     [DIGITS, '--config.method=rslad', '--config.teacher.source=torch',
      '--config.teacher.path={torch4}', '--config.teacher.model.name=small_cnn',
      '--config.teacher.model.width=8'], 'of another shape'),
    ('wrong data path, download off', [CIFAR, '--config.data.dir={tmp}/nowhere',
                                       '--config.data.download=False'], 'cifar10 not found'),
    ('dataset absent and its URL unreachable',
     [CIFAR, '--config.data.dir={tmp}/nowhere', '--config.data.url=http://127.0.0.1:9/c.tar.gz',
      '--config.data.checksum=md5:c58f30108f718f92721af3b95e74349a'],
     'cannot download cifar10 from http://127.0.0.1:9/c.tar.gz'),
    ('malformed data checksum', [CIFAR, '--config.data.checksum=md5:123'],
     "data.checksum 'md5:123' must be md5:<32 hex digits>"),
    ('labels out of range', [CIFAR, '--config.data.dir={cifar_bad_labels}', '--config.batch_size=2'],
     r'labels must lie in [0, 10)'),
    ('pickle that carries code', [CIFAR, '--config.data.dir={cifar_evil}'], 'refusing to load'),
    ('truncated data file', [CIFAR, '--config.data.dir={cifar_truncated}'],
     'data_batch_1: pickle data was truncated'),
    ('unknown data source', [DIGITS, '--config.data.source=hdf5'], 'data.source'),
    ('evaluate without a checkpoint', [DIGITS, '--mode=evaluate'], 'no checkpoint in'),
    ('missing PyTorch checkpoint', [DIGITS, '--mode=evaluate', '--checkpoint={tmp}/model.pt'],
     'model.pt not found'),
    ('PyTorch checkpoint that carries code', [DIGITS, '--mode=evaluate',
                                              '--checkpoint={torch_evil}'],
     'torch_evil.pt holds more than tensors and torch.load(weights_only=True) refused it'),
    ('PyTorch checkpoint of another architecture',
     [DIGITS, '--mode=evaluate', '--config.model.width=8', '--checkpoint={torch4}'],
     'of another shape'),
    ('work directory that is a file', [DIGITS, '--workdir={tmp}/file.txt'], 'file.txt'),
    # Run with torch and pyautoattack made unimportable (HIDE_TORCH).
    ('autoattack without the torch extra', [DIGITS, '--mode=autoattack'],
     '--mode=autoattack needs PyTorch and AutoAttack: pip install -r requirements-torch.txt'),
]
HIDE_TORCH = ('autoattack without the torch extra',)

SETUP = {
    'cifar_bad_labels': lambda tmp: _cifar_dir(tmp / 'bad_labels', labels=(0, 1, 2, 12)),
    'cifar_evil': lambda tmp: _cifar_dir(tmp / 'evil', evil=True),
    'cifar_truncated': lambda tmp: _cifar_dir(tmp / 'truncated', truncate=True),
    'torch4': lambda tmp: _torch_file(tmp / 'small_cnn_w4.pt', 4),
    'torch_evil': lambda tmp: _evil_torch_file(tmp / 'torch_evil.pt'),
}


def _evil_torch_file(path):
  import torch  # pylint: disable=g-import-not-at-top

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {path}.pwned',))

  torch.save({'conv.weight': Evil()}, str(path))
  return str(path)


def test_there_are_at_least_twenty_cases():
  assert len({c[0] for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize('name,args,needle', CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_a_non_zero_exit(name, args, needle, tmp_path, capfd,
                                                     monkeypatch):
  if name in HIDE_TORCH:  # as if requirements-torch.txt were not installed
    for module in ('torch', 'pyautoattack'):
      monkeypatch.setitem(sys.modules, module, None)
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  (tmp_path / 'file.txt').write_text('not a directory\n')
  values = {'tmp': str(tmp_path)}
  for key, make in SETUP.items():
    if any('{' + key + '}' in a for a in args):
      values[key] = make(tmp_path)
  args = [a.format(**values) for a in args]
  if not any(a.startswith('--workdir') for a in args):
    args.append(f'--workdir={tmp_path / "work"}')
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  capfd.readouterr()
  code = run_in_process(*args)
  out, err = capfd.readouterr()
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2, (out, err)  # the README's promise: exit 2, before any training step
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  assert all(after.get(p) == t for p, t in before.items()), 'an existing file was changed'
  written = [p for p in after if p not in before]
  assert not [p for p in written if p.name != 'config.json' and p.name != 'environment.json'
              and 'jax_cache' not in str(p)], written
  assert len(lines) == 1, err
  assert lines[0].startswith('error: ') and needle in lines[0], lines[0]
  assert not list(tmp_path.rglob('*.pwned')) and not (tmp_path / 'evil' / 'pwned').exists()
