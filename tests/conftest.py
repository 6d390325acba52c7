import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)

# XLA:CPU's LLVM backend at -O2 for every test and the processes tests start (the default is
# -O3): the tests' programs are tiny and most of their time is compilation, which -O2 makes
# 3x faster; their runs are short, so the 2x slower loops of -O2 cost less than that saves
# (docs/testing.md). The HLO passes, and so the programs' maths, are the same. A level already
# in XLA_FLAGS wins.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=2'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a process a test starts: the suite's own, then ``flags``."""
  return ' '.join((os.environ['XLA_FLAGS'], *flags))


import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top

# One persistent compilation cache for the session and the processes it starts: many tests
# compile the same tiny programs (every train_and_evaluate builds its own jit), and XLA
# compilation, not computation, is most of their time on 2 cores.
COMPILATION_CACHE = os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'ltd_jax_test_xla_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def shared_path(*parts):
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f'{path} is not present')
  return path


@pytest.fixture
def tiny_config():
  return make_tiny_config()


def apply_overrides(config, overrides: dict) -> None:
  """Sets ``{'a.b': value}`` entries of a ConfigDict."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value


def make_tiny_config():
  """TRADES on digits with a 4-wide CNN, 2 epochs of 4 steps: seconds per run."""
  c = config_lib.default_config()
  c.method = 'trades'
  c.eps = 0.2
  c.data.name = 'digits'
  c.model.name = 'small_cnn'
  c.model.width = 4
  c.num_epochs = 2
  c.batch_size = 256
  c.max_steps = 0
  c.optim.lr = 0.05
  c.optim.lr_boundaries_epochs = (1,)
  c.attack.alpha = 0.05
  c.attack.steps = 2
  c.eval.every_epochs = 1
  c.eval.subset_size = 100
  c.eval.final_subset_size = 100
  c.eval.batch_size = 100
  c.eval.pgd_steps = 2
  c.eval.cw_steps = 2
  c.eval.alpha = 0.1
  c.log_every_steps = 2
  c.progress_bar = False
  c.report.plots = False  # a second or two of every run; the tests of the plots turn them on
  return c


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', help='also run tests marked slow')


# The modules whose tests take longest (CI's --durations), run first: with two test processes
# (README's command: pytest-xdist, a module's tests in one process) the long ones start at once
# and the short ones fill in beside them, rather than one long module running alone at the end.
LONGEST_MODULES_FIRST = ('test_gpu_check.py', 'test_parallel.py', 'test_faults.py',
                         'test_input_pipeline.py', 'test_distillation.py', 'test_export_autoattack.py',
                         'test_teacher.py', 'test_paper_configs.py')


def fastest_first(items, durations: dict) -> None:
  """The order for a mutation run (mutmut stops at a mutant's first failing test): modules by
  their fastest test, each module's tests fastest first, so a killed mutant stops at the cheapest
  test that kills it, and a module's tests stay together (its fixtures are built once). Tests
  without a duration go last, in their order."""
  seconds = lambda item: durations.get(item.nodeid, float('inf'))
  first = {}
  for item in items:
    first[item.path] = min(first.get(item.path, float('inf')), seconds(item))
  items.sort(key=lambda item: (first[item.path], seconds(item)))


def pytest_collection_modifyitems(config, items):
  durations_file = os.environ.get('LTD_JAX_TEST_DURATIONS', '')  # set by scripts/mutation.py
  if durations_file and os.path.exists(durations_file):
    import json  # pylint: disable=g-import-not-at-top
    with open(durations_file) as f:
      fastest_first(items, json.load(f).get('duration_by_test', {}))
  else:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
  if config.getoption('--runslow'):
    return
  skip = pytest.mark.skip(reason='paper-scale smoke run: pass --runslow')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)


def run_in_process(*args) -> int:
  """Exit status of ``python run.py ARGS`` run in this process (0 when it returns): run.py's
  own parse_flags and main, as app.run calls them, in milliseconds rather than a JAX start-up."""
  import run  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # config_flags defines one flag per override when it parses
  cwd, argv = os.getcwd(), sys.argv
  os.chdir(ROOT)
  sys.argv = ['run.py', *args]  # config_flags reads the --config.* overrides from sys.argv
  try:
    run.parse_flags(sys.argv)
    run.main(sys.argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1
  finally:
    os.chdir(cwd)
    sys.argv = argv
  return 0
