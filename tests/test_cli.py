"""The command line: bad input gives one clear line and a non-zero exit, before any compilation."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_path


def run_cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def error_line(proc):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_unknown_config_key_is_named_with_a_suggestion():
  line = error_line(run_cli('--config=configs/trades_digits.py', '--config.optim.learning_rate=0.1'))
  assert "unknown config key 'optim.learning_rate'" in line and '--config.optim.lr' in line


def test_mistyped_value_and_missing_config_file():
  line = error_line(run_cli('--config=configs/trades_digits.py', '--config.eps=big'))
  assert 'eps' in line
  line = error_line(run_cli('--config=configs/nope.py'))
  assert 'configs/nope.py not found' in line
  line = error_line(run_cli())
  assert '--config=' in line


@pytest.mark.parametrize('override,needle', [
    ('--config.eps=-0.1', 'eps must be >= 0'),
    ('--config.method=fgsm_at', 'unknown method'),
    ('--config.model.name=vgg', 'unknown model'),
    ('--config.batch_size=5000', 'batch_size=5000 exceeds'),
    ('--config.eval.selection=best', 'eval.selection'),
    ("--config.optim.lr_boundaries_epochs=(5,2)", 'increasing'),
])
def test_invalid_values_fail_with_one_line(override, needle, tmp_path):
  line = error_line(run_cli('--config=configs/trades_digits.py', override,
                            f'--workdir={tmp_path}'))
  assert needle in line


def test_missing_dataset_names_the_paths(tmp_path):
  line = error_line(run_cli('--config=configs/trades_cifar10.py', f'--config.data.dir={tmp_path}',
                            f'--workdir={tmp_path / "w"}', '--config.data.download=False'))
  assert 'cifar10 not found' in line and str(tmp_path) in line and 'data.download=True' in line


def test_evaluate_without_checkpoint(tmp_path):
  line = error_line(run_cli('--config=configs/trades_digits.py', '--mode=evaluate',
                            f'--workdir={tmp_path}'))
  assert 'no checkpoint' in line


def test_train_then_evaluate_from_the_command_line(tmp_path):
  common = ['--config=configs/trades_digits.py', f'--workdir={tmp_path}', '--config.num_epochs=1',
            '--config.model.width=4', '--config.eval.final=("clean","pgd20")',
            '--config.eval.pgd_steps=2', '--config.attack.steps=1', '--config.progress_bar=False']
  proc = run_cli(*common)
  assert proc.returncode == 0, proc.stderr
  assert '| pgd20 |' in proc.stdout and 'work directory' in proc.stdout
  proc = run_cli(*common, '--mode=evaluate', '--checkpoint=latest')
  assert proc.returncode == 0, proc.stderr
  assert 'Checkpoint: latest (step 22)' in proc.stdout


def test_default_workdir_is_derived_from_the_config_name():
  import run  # pylint: disable=g-import-not-at-top
  assert run.default_workdir('configs/absld_cifar10.py') == os.path.join('workdirs', 'absld_cifar10')


def test_missing_pytorch_checkpoint_is_one_line(tmp_path):
  line = error_line(run_cli('--config=configs/trades_digits.py', '--mode=evaluate',
                            f'--checkpoint={tmp_path / "model_cifar_wrn.pt"}',
                            f'--workdir={tmp_path / "w"}'))
  assert 'model_cifar_wrn.pt not found' in line


def test_default_workdir_of_an_imported_checkpoint_is_its_own():
  import run  # pylint: disable=g-import-not-at-top
  assert run.default_workdir('configs/trades_cifar10.py', '/ckpt/model_cifar_wrn.pt') == \
      os.path.join('workdirs', 'trades_cifar10_model_cifar_wrn')
  assert run.default_workdir('configs/trades_cifar10.py', 'best') == \
      os.path.join('workdirs', 'trades_cifar10')
