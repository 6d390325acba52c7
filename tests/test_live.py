"""What a run shows while it trains: console lines per epoch and evaluation, the resume line,
TensorBoard event files equal to metrics.jsonl, a profiler trace on request, and the command
line's forms (``--config PATH``, ``PATH:VARIANT``, ``--help``)."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_in_process

TINY = ['--config=configs/trades_digits.py', '--config.num_epochs=2', '--config.model.width=4',
        '--config.attack.steps=2', '--config.eval.every_epochs=2', '--config.eval.subset_size=60',
        '--config.eval.final_subset_size=60', '--config.eval.pgd_steps=2',
        '--config.eval.cw_steps=2', '--config.progress_bar=False', '--config.log_every_steps=5']


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of every scalar in the TensorBoard event files of ``directory``,
  read from the TFRecord framing with tensorboardX's own Event protobuf."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    blob = open(path, 'rb').read()
    i = 0
    while i < len(blob):
      (length,) = struct.unpack('<Q', blob[i:i + 8])
      event = event_pb2.Event.FromString(blob[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_console_lines_tensorboard_and_resume(tmp_path, capfd):
  workdir = tmp_path / 'run'
  assert run_in_process(*TINY, f'--workdir={workdir}', '--config.max_steps=30') == 0
  out = capfd.readouterr().out
  # 22 steps per epoch: epoch 1 ends without an evaluation, epoch 2 is cut at step 30.
  assert 'epoch 1/2 step 22: loss ' in out and 'images/s' in out
  assert run_in_process(*TINY, f'--workdir={workdir}') == 0  # the rest of epoch 2
  out = capfd.readouterr().out
  assert f'resumed from step 30 of 44 ({workdir})' in out
  line = next(l for l in out.splitlines() if l.startswith('epoch 2/2 step 44 (test): '))
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  ev = [r for r in records if r['kind'] == 'eval'][-1]
  assert f"pgd20 {100 * ev['pgd20/avg']:.2f}% (worst class {100 * ev['pgd20/worst']:.2f}%)" in line
  assert f"robust score {ev['selection_score']:.4f}, new best" in line
  # TensorBoard: every number of every record, per-class lists class by class.
  events = read_events(str(workdir / 'tensorboard'))
  for r in records:
    for key, value in r.items():
      if key in ('kind', 'step', 'time') or isinstance(value, (bool, str)):
        continue
      for c, v in enumerate(value if isinstance(value, list) else [value]):
        tag = f"{r['kind']}/{key}" + (f'/{c}' if isinstance(value, list) else '')
        assert (r['step'], pytest.approx(v, rel=1e-6)) in events[tag], tag
  assert len(events['eval/pgd20/per_class/9']) == 1 and 'train/loss' in events


def test_tensorboard_writer_starts_without_pytorch(tmp_path):
  """The event writer does not load torch (seconds of every run's start) unless the process has;
  torch still imports afterwards, and the events hold the values written."""
  code = (
      'import sys\n'
      'from ltd_jax import reports\n'
      'writer = reports.MetricWriter(sys.argv[1])\n'
      'writer.write("train", 3, loss=0.25, per_class=[0.5, 0.75])\n'
      'writer.close()\n'
      'print("torch" in sys.modules)\n'
      'import torch\n'
      'print(torch.ones(2).sum().item())\n')
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['False', '2.0']
  events = read_events(str(tmp_path / 'tensorboard'))
  assert events == {'train/loss': [(3, 0.25)], 'train/per_class/0': [(3, 0.5)],
                    'train/per_class/1': [(3, 0.75)]}


def test_profiler_trace_of_the_steps_asked_for(tmp_path, capfd):
  workdir = tmp_path / 'run'
  assert run_in_process(*TINY, f'--workdir={workdir}', '--config.max_steps=6',
                        '--config.profile.steps=(2,4)') == 0
  assert 'profiler trace of steps 2-4' in capfd.readouterr().out
  traces = glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  assert run_in_process(*TINY, f'--workdir={tmp_path / "bad"}', '--config.profile.steps=(4,2)') == 2
  assert 'profile.steps must be (start, stop)' in capfd.readouterr().err


def test_config_path_forms_and_help(tmp_path, capfd):
  # --config PATH (big_vision's form) and PATH:VARIANT (ml_collections') reach the same code.
  assert run_in_process('--config', 'configs/absld_cifar10.py:subset', '--mode=evaluate',
                        f'--workdir={tmp_path}') == 2
  assert f'no checkpoint in {tmp_path}' in capfd.readouterr().err  # parsed, then no checkpoint
  assert run_in_process('--config=configs/absld_cifar10.py:tiny') == 2
  assert "unknown config variant 'tiny'" in capfd.readouterr().err
  from ltd_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.default_workdir('configs/absld_cifar10.py:subset') == os.path.join(
      'workdirs', 'absld_cifar10_subset')
  assert run_in_process('--help') == 0
  out = capfd.readouterr().out
  for mode in ('train', 'evaluate', 'export', 'autoattack', 'audit', 'temperature_search'):
    assert any(l.split()[:1] == [mode] for l in out.splitlines()), mode
  assert '--workdir' in out and '--config' in out
