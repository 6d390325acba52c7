"""One prepared run that proves ltd_jax on a GPU: tests, speed against PyTorch, a real comparison.

    bash scripts/gpu_check.sh --out=$OUT            # on the GPU machine (after gpu_prepare.sh here)
    bash scripts/gpu_check.sh --dry-run --out=DIR   # the same script on a CPU, tiny sizes

Stages, each independent (one failing or timing out does not stop the next), each command with
its own share of the stage's budget, everything logged under ``--out``:
  1. ``pytest`` on fast tests that need no CPU-only PyTorch, with JAX on the accelerator.
  2. ``benchmarks/train_step.py`` (ResNet-18 ABSLD / RSLAD / TRADES-AWP in float32; WRN-34-10
     TRADES and TRADES-AWP in bfloat16, TRADES in float32) against PyTorch eager and
     ``torch.compile`` in the same process, then ``benchmarks/attack_loop.py`` (attack unrolled
     against ``lax.fori_loop``, training and evaluation).
  3. RSLAD against ABSLD on the real CIFAR-10 subset: a TRADES ResNet-18 teacher trained in the
     run, then both students (ResNet-18, the paper configs with a shortened schedule, the same
     'fair' selection) for every seed at once on the one card, then the official AutoAttack on
     each exported student on the same card; mean +- std over the seeds that finished.

Output (at most 8 files, as the device tool returns them): summary.md (machine, versions,
stage status and times, every table), stage1_tests.log, stage2_benchmarks.log,
stage3_training.log, benchmarks.md, comparison.md, runs.tar.gz (each run's records, no
checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

# Fast tests that need no CPU-only PyTorch (stage 1), the reference parity suite last (JAX on the
# GPU against PyTorch on the CPU); the dry run takes the first file only.
STAGE1_TESTS = ('tests/test_losses.py', 'tests/test_attacks.py', 'tests/test_evaluate.py',
                'tests/test_distillation.py', 'tests/test_mixed_precision.py',
                'tests/test_models.py', 'tests/test_reference_parity.py')
# JAX takes this share of the GPU per process when PyTorch shares the card (stage 2, AutoAttack);
# the parallel student runs of stage 3 split STUDENT_MEM_SHARE between them.
MEM_FRACTION_WITH_TORCH = '0.45'
STUDENT_MEM_SHARE = 0.85


class Stage:
  """Runs commands under one budget: each gets min(its timeout, what is left of the budget).
  ``budget_s=inf`` (the dry run) sets no wall-clock limit; ``flag`` names the option that
  raises the budget, for the status line of a command that ran out of it."""

  def __init__(self, name: str, budget_s: float, log_path: str, flag: str = ''):
    self.name, self.budget_s, self.log_path, self.flag = name, budget_s, log_path, flag
    self.start = self.end = time.monotonic()
    self.status: list[str] = []

  def left(self) -> float:
    return self.budget_s - (time.monotonic() - self.start)

  def left_but(self, reserve: float) -> float | None:
    """Seconds left once ``reserve`` (a share of the budget) is kept for later commands; None
    (no limit) without a budget."""
    return None if self.budget_s == float('inf') else self.left() - reserve * self.budget_s

  def _log(self, text: str) -> None:
    with open(self.log_path, 'a') as f:
      f.write(text)

  def run(self, label: str, cmd: list[str], timeout_s: float | None = None,
          env: dict | None = None) -> bool:
    """Runs ``cmd`` (output appended to the stage's log); True when it exits 0 in time."""
    return self.run_parallel([(label, cmd, env)], timeout_s)[0]

  def run_parallel(self, jobs, timeout_s: float | None = None) -> list[bool]:
    """Runs ``[(label, cmd, env)]`` at once, each logged to its own file, then appended to the
    stage's log in order; all are killed when the timeout or the stage budget runs out."""
    if timeout_s is not None and self.budget_s == float('inf'):
      timeout_s = None  # no budget, no share of it
    limit = min(timeout_s or float('inf'), self.left())
    if self.left() < 1:
      for label, _, _ in jobs:
        self.status.append(f'{label}: skipped (stage budget spent{"; raise " + self.flag if self.flag else ""})')
      return [False] * len(jobs)
    procs = []
    for i, (label, cmd, env) in enumerate(jobs):
      out = open(f'{self.log_path}.{i}.part', 'w')
      out.write(f'\n===== {label}\n$ {shlex.join(cmd)}\n')
      out.flush()
      full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
      procs.append((label, subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env=full_env, start_new_session=True), out,
                    time.monotonic()))
    deadline = time.monotonic() + limit
    results = []
    for label, proc, out, t0 in procs:
      try:
        rc = proc.wait(timeout=None if limit == float('inf')
                       else max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
      seconds = time.monotonic() - t0
      out.write(f'===== {label}: {"timed out" if rc is None else f"exit {rc}"} '
                f'after {seconds:.0f} s\n')
      out.close()
      raise_it = f' (raise {self.flag})' if self.flag else ''
      verdict = (f'timed out{raise_it}' if rc is None else 'ok' if rc == 0
                 else f'failed (exit {rc})')
      self.status.append(f'{label}: {verdict}, {seconds:.0f} s')
      results.append(rc == 0)
    for i in range(len(procs)):
      part = f'{self.log_path}.{i}.part'
      with open(part) as f:
        self._log(f.read())
      os.remove(part)
    self.end = time.monotonic()
    return results


def tail(path: str, lines: int = 15) -> str:
  try:
    with open(path) as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


def environment_lines() -> list[str]:
  """The machine: GPU (nvidia-smi), Python, library versions and JAX's devices."""
  lines = []
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
    lines.append(f'- GPU (nvidia-smi): {smi.stdout.strip() or smi.stderr.strip()}')
  except (OSError, subprocess.TimeoutExpired):
    lines.append('- GPU (nvidia-smi): none')
  probe = ('import importlib.metadata as m, platform, json\n'
           'v = {}\n'
           'for n in ("jax","jaxlib","jax-cuda13-plugin","jax-cuda12-plugin","flax","optax",'
           '"orbax-checkpoint","ml-collections","torch","pyautoattack","numpy","grain",'
           '"tensorflow-datasets"):\n'
           '  try: v[n] = m.version(n)\n'
           '  except m.PackageNotFoundError: pass\n'
           'import jax\n'
           'print(json.dumps({"python": platform.python_version(), "versions": v,'
           ' "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend()}))\n')
  try:
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    lines += [f'- Python {info["python"]}; JAX backend {info["backend"]}, devices '
              f'{", ".join(info["devices"])}',
              '- ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items())]
  except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as e:
    lines.append(f'- environment probe failed: {type(e).__name__}: {e}')
  return lines


def stage1(args, log: str) -> Stage:
  stage = Stage('1 tests', args.budget1, log, '--budget1')
  tests = STAGE1_TESTS[:1] if args.dry_run else STAGE1_TESTS
  # The tests check numbers to float32 precision: no TF32 (JAX's default on GPUs) for them.
  stage.run('pytest', [sys.executable, '-m', 'pytest', '-q', '-rfE', '-p', 'no:cacheprovider',
                       *tests], env={'JAX_DEFAULT_MATMUL_PRECISION': 'highest'})
  return stage


def benchmark_commands(args, tmp: str) -> list[tuple[str, list[str], float]]:
  """(label, command, share of the stage budget) of stage 2, most wanted first; each writes
  TMP/<label>.md."""
  py, bench = sys.executable, 'benchmarks/train_step.py'
  if args.dry_run:
    tiny = ['--model=small_cnn', '--batch=8', '--attack_steps=2', '--steps=1']
    return [
        ('small_cnn_f32', [py, bench, *tiny, '--methods=absld', '--torch=eager,compile'], 0.7),
        ('attack_loop', [py, 'benchmarks/attack_loop.py', *tiny, '--pgd_steps=2',
                         '--cw_steps=2'], 0.3),
    ]
  b = ['--batch=128', '--steps=5']
  return [
      # --predict: the same steps compiled deviceless for an H200, as --mode=compile does
      # without one, beside what the device measures (docs/gpu_plan.md's calibration).
      ('resnet18_f32', [py, bench, '--model=resnet18', *b, '--methods=absld,rslad,awp',
                        '--torch=eager,compile', '--predict=h200'], 0.9),
      ('wrn34_bf16', [py, bench, '--model=wrn-34-10', *b, '--dtype=bfloat16',
                      '--methods=trades,awp', '--torch=eager,compile'], 0.9),
      ('wrn34_f32', [py, bench, '--model=wrn-34-10', *b, '--methods=trades', '--torch=eager'],
       0.55),
      ('attack_loop', [py, 'benchmarks/attack_loop.py', '--model=resnet18', *b], 0.55),
  ]


def stage2(args, log: str, tmp: str) -> Stage:
  stage = Stage('2 benchmarks', args.budget2, log, '--budget2')
  env = {'XLA_PYTHON_CLIENT_MEM_FRACTION': MEM_FRACTION_WITH_TORCH}
  for label, cmd, share in benchmark_commands(args, tmp):
    stage.run(label, cmd + [f'--out={os.path.join(tmp, label + ".md")}'],
              share * args.budget2, env)
  return stage


def run_overrides(args, data_dir: str) -> dict[str, list[str]]:
  """--config overrides of stage 3: the teacher's and the students' (both methods)."""
  # No PNGs: runs.tar.gz leaves them out.
  common = [f'--config.data.dir={data_dir}', '--config.progress_bar=False',
            '--config.report.plots=False']
  if args.dry_run:
    # Batch 2048: two steps make the one epoch, so its end (ABSLD's update, evaluation,
    # selection) runs too.
    tiny = ['--config.model.name=small_cnn', '--config.model.width=4',
            '--config.batch_size=2048', '--config.num_epochs=1', '--config.attack.steps=2',
            '--config.eval.subset_size=20', '--config.eval.final_subset_size=40',
            '--config.eval.batch_size=20', '--config.eval.pgd_steps=2', '--config.eval.cw_steps=2',
            '--config.eval.every_epochs=1', '--config.optim.lr_boundaries_epochs=(1,)']
    return {'teacher': common + tiny,
            'student': common + tiny + ['--config.teacher.source=workdir',
                                        '--config.eval.selection=fair']}
  e_t, e_s = args.teacher_epochs, args.student_epochs
  milestones = lambda e: '(' + ','.join(str(max(1, round(e * f))) for f in (215 / 300, 260 / 300,
                                                                              285 / 300)) + ')'
  return {
      'teacher': common + ['--config.model.name=resnet18', f'--config.num_epochs={e_t}',
                           f'--config.optim.lr_boundaries_epochs=({max(1, e_t - 2)},)',
                           f'--config.eval.every_epochs={e_t}', '--config.eval.subset_size=500',
                           "--config.eval.final=('clean','pgd20')"],
      'student': common + [f'--config.num_epochs={e_s}',
                           f'--config.optim.lr_boundaries_epochs={milestones(e_s)}',
                           '--config.eval.every_epochs=2', '--config.eval.subset_size=1017',
                           '--config.eval.selection=fair', '--config.teacher.source=workdir'],
  }


def stage3(args, log: str, work: str, data_dir: str) -> tuple[Stage, dict]:
  stage = Stage('3 training', args.budget3, log, '--budget3')
  over = run_overrides(args, data_dir)
  teacher_dir = os.path.join(work, 'teacher')
  py = sys.executable
  results: dict[str, list[dict]] = {'rslad': [], 'absld': []}
  # Budget: the teacher up to 35%, the students what is left but 25%, AutoAttack the rest.
  if not stage.run('teacher (TRADES)', [py, 'run.py', '--config=configs/trades_cifar10.py',
                                        f'--workdir={teacher_dir}', *over['teacher']],
                   0.35 * args.budget3):
    return stage, results
  seeds = [int(s) for s in args.seeds.split(',')]
  share = f'{STUDENT_MEM_SHARE / (2 * len(seeds)):.3f}'
  jobs, dirs = [], []
  for seed in seeds:
    for method in ('absld', 'rslad'):
      wd = os.path.join(work, f'{method}_seed{seed}')
      dirs.append((method, wd, seed))
      jobs.append((f'{method} seed {seed}',
                   [py, 'run.py', f'--config=configs/{method}_cifar10.py', f'--workdir={wd}',
                    f'--config.teacher.path={teacher_dir}', f'--config.seed={seed}',
                    *over['student']],
                   {'XLA_PYTHON_CLIENT_MEM_FRACTION': share}))
  done = stage.run_parallel(jobs, stage.left_but(0.25))
  aa = [f'--config.autoattack.n_examples={args.aa_examples}',
        f'--config.autoattack.device={"cpu" if args.dry_run else "cuda"}']
  aa_jobs = [(f'autoattack {method} seed {seed}',
              [py, 'run.py', f'--config=configs/{method}_cifar10.py', f'--workdir={wd}',
               '--mode=autoattack', f'--config.teacher.path={teacher_dir}',
               f'--config.seed={seed}', *over['student'], *aa],
              {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'})  # the rest is PyTorch's
             for (method, wd, seed), ok in zip(dirs, done) if ok]
  stage.run_parallel(aa_jobs)
  for (method, wd, _), ok in zip(dirs, done):
    with contextlib.suppress(OSError, ValueError):
      if ok:
        with open(os.path.join(wd, 'results.json')) as f:
          results[method].append(json.load(f))
  return stage, results


def comparison_lines(results: dict[str, list[dict]], args) -> list[str]:
  import compare_methods  # pylint: disable=g-import-not-at-top
  results = {k: v for k, v in results.items() if v}
  if not results:
    return ['No student run finished.']
  seeds = [int(s) for s in args.seeds.split(',')]
  lines = compare_methods.seed_table(results, seeds, ('clean', 'pgd20', 'autoattack'))
  lines += ['', 'Per-class PGD-20 accuracy (mean over seeds, percent):', '']
  names = next(iter(results.values()))[0]['class_names']
  lines += ['| method | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  for method, per_seed in results.items():
    per_class = [sum(r['attacks']['pgd20']['per_class'][c] for r in per_seed) / len(per_seed)
                 for c in range(len(names))]
    lines.append(f'| {method} | ' + ' | '.join(f'{100 * a:.1f}' for a in per_class) + ' |')
  return lines


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=os.environ.get('OUT', 'gpu_check_out'))
  p.add_argument('--dry_run', '--dry-run', action='store_true',
                 help='tiny sizes on any machine (the CI test runs it)')
  p.add_argument('--stages', default='1,2,3')
  p.add_argument('--data_dir', default='',
                 help='folder holding cifar-10-batches-py (default: data/cifar-10-subset, '
                      'else ../shared/data/cifar-10-subset)')
  p.add_argument('--work', default='', help='work directories of stage 3 (default: a temp folder)')
  # Seconds per stage on the GPU machine (cold compilation cache; 495 s in all, inside the 8
  # minutes the check must fit; stage 2 holds 40 s for the three deviceless H200 compiles of
  # --predict, which took 10-20 s each for ResNet-18 steps on 2 CPU cores); the dry run has none unless given: its stages are timed only
  # by the caller (CI's own limit), since compile times on CPUs vary by machine.
  p.add_argument('--budget1', type=float, default=None)
  p.add_argument('--budget2', type=float, default=None)
  p.add_argument('--budget3', type=float, default=None)
  p.add_argument('--teacher_epochs', type=int, default=10)
  p.add_argument('--student_epochs', type=int, default=12)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--aa_examples', type=int, default=0,
                 help='AutoAttack images (0: the final evaluation\'s, all 1,017 test images)')
  args = p.parse_args()
  defaults = (float('inf'),) * 3 if args.dry_run else (60.0, 210.0, 225.0)
  for i, default in enumerate(defaults, 1):
    if getattr(args, f'budget{i}') is None:
      setattr(args, f'budget{i}', default)
  if args.dry_run:
    args.seeds = '0'
    args.aa_examples = args.aa_examples or 10
  os.makedirs(args.out, exist_ok=True)
  work = args.work or os.path.join('/tmp' if os.path.isdir('/tmp') else args.out,
                                   f'ltd_jax_gpu_check_{os.getpid()}')
  tmp = os.path.join(work, 'tables')
  os.makedirs(tmp, exist_ok=True)
  data_dir = args.data_dir or next(
      (d for d in (os.path.join(ROOT, 'data', 'cifar-10-subset'),
                   os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'cifar-10-subset'))
       if os.path.isdir(os.path.join(d, 'cifar-10-batches-py'))), '')
  t0 = time.monotonic()
  summary = ['# ltd_jax GPU check' + (' (dry run)' if args.dry_run else ''), '',
             f'- date: {time.strftime("%Y-%m-%d %H:%M:%S %Z")}; git commit '
             f'{_git_commit()}; command: {shlex.join(sys.argv)}',
             *environment_lines(), f'- data: {data_dir or "CIFAR-10 subset not found"}', '']
  stages, tables, comparison = [], [], ['Stage 3 did not run.']
  wanted = set(args.stages.split(','))
  if '1' in wanted:
    stages.append(stage1(args, os.path.join(args.out, 'stage1_tests.log')))
  if '2' in wanted:
    stages.append(stage2(args, os.path.join(args.out, 'stage2_benchmarks.log'), tmp))
    for path in sorted(glob.glob(os.path.join(tmp, '*.md'))):
      with open(path) as f:
        tables += [f'## {os.path.basename(path)[:-3]}', '', f.read()]
    _write(os.path.join(args.out, 'benchmarks.md'), tables or ['No benchmark table was written.'])
  if '3' in wanted:
    if not data_dir:
      comparison = ['Stage 3 skipped: no cifar-10-batches-py (run scripts/gpu_prepare.sh).']
    else:
      stage, results = stage3(args, os.path.join(args.out, 'stage3_training.log'), work, data_dir)
      stages.append(stage)
      comparison = comparison_lines(results, args)
      with tarfile.open(os.path.join(args.out, 'runs.tar.gz'), 'w:gz') as tar:
        for path in glob.glob(os.path.join(work, '**', '*'), recursive=True):
          if (os.path.isfile(path) and '/checkpoints/' not in path and '/best/' not in path
              and '/export/' not in path and not path.endswith(('.png', '.safetensors', '.pt'))):
            tar.add(path, arcname=os.path.relpath(path, work))
    _write(os.path.join(args.out, 'comparison.md'), comparison)
  summary += ['## Stages', '']
  for s in stages:
    budget = 'no budget' if s.budget_s == float('inf') else f'budget {s.budget_s:.0f} s'
    summary.append(f'- stage {s.name} ({budget}, {s.end - s.start:.0f} s used):')
    summary += [f'  - {line}' for line in s.status]
  summary += ['', f'Total {time.monotonic() - t0:.0f} s.', '', '## Benchmarks', '', *tables,
              '## RSLAD vs ABSLD (CIFAR-10 subset)', '', *comparison]
  if '1' in wanted:
    summary += ['', '## Stage 1 tail', '', '```',
                tail(os.path.join(args.out, 'stage1_tests.log')), '```']
  _write(os.path.join(args.out, 'summary.md'), summary)
  print('\n'.join(summary))
  failed = [line for s in stages for line in s.status if not line.split(': ', 1)[1].startswith('ok')]
  sys.exit(1 if failed else 0)


def _write(path: str, lines: list[str]) -> None:
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, cwd=ROOT, timeout=10).stdout.strip() or 'unknown'
  except (OSError, subprocess.TimeoutExpired):
    return 'unknown'


if __name__ == '__main__':
  main()
