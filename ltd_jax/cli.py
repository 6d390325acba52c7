"""The ltd_jax command line: ``python run.py`` or, installed, ``ltd-jax``.

    ltd-jax --config=NAME[:VARIANT] [--config.a.b=value ...] [--workdir=DIR] [--mode=MODE]

NAME is a bundled config (``ltd-jax --list-configs``) or the path of a config file.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ltd_jax import config_lib
from ltd_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A bundled config\'s name (ltd-jax --list-configs) or a config file\'s path, '
                                          'with :VARIANT if it takes one.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory (default: workdirs/<config name>).')
MODES = {
    'train': 'train (resuming from the work directory\'s latest checkpoint), then evaluate the '
             'selected checkpoint with every attack',
    'evaluate': 'evaluate a saved checkpoint, or a PyTorch file given as --checkpoint',
    'export': 'write the checkpoint as a PyTorch state_dict (.safetensors, .pt, model.json)',
    'autoattack': 'run the official AutoAttack on the exported model; add it to the results',
    'audit': 'the gradient-masking audit of a checkpoint (exit status 1 on signs of masking)',
    'temperature_search': 'LTD\'s two-step search of the teacher temperature',
    'compile': 'compile the run\'s steps for --config.compile.target (h200, h100, a100, '
               'rtx3090, tpu-v5e, ...) without one: memory, FLOPs, time of the run',
}
USAGE = ('usage: ltd-jax (or python run.py) --config=NAME[:VARIANT] '
         '[--config.a.b=value ...] [--workdir=DIR] [--mode=MODE] [--checkpoint=WHICH]\n'
         '       ltd-jax --list-configs\n\n'
         'NAME: a bundled config (--list-configs) or the path of a config file (configs/NAME.py '
         'in a checkout; a file of your own may import ltd_jax.configs.NAME and its neighbours)'
         '\n\nmodes:\n'
         + '\n'.join(f'  {name:<19}{text}' for name, text in MODES.items()))
_MODE = flags.DEFINE_enum('mode', 'train', list(MODES), 'One of the modes above (default train).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'auto', 'evaluate / export / autoattack / audit: auto (best if kept, else latest), '
    'best, latest (each with :ema for the EMA weights of a run with ema.decay > 0), or the path '
    'of a PyTorch .pt/.pth/.safetensors file of config.model.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_arg(argv) -> tuple[int, str | None]:
  """Where the config argument is (``--config=SPEC`` or ``--config SPEC``) and its SPEC."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return i, a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return -1, None


def config_spec(argv) -> str | None:
  """The config argument, ``--config=SPEC`` or ``--config SPEC`` (SPEC: NAME or PATH, [:ARG])."""
  return _config_arg(argv)[1]


def with_config_path(argv) -> list[str]:
  """``argv`` with its config argument replaced by the file it names (ml_collections' config
  flag reads a path): a bundled config's name becomes its file in the package."""
  argv = list(argv)
  i, spec = _config_arg(argv)
  if spec is not None:
    path, arg = config_lib.resolve_config_spec(spec)
    resolved = path if arg is None else f'{path}:{arg}'
    argv[i] = '--config=' + resolved if argv[i].startswith('--config=') else resolved
  return argv


def print_config_list() -> None:
  configs = config_lib.bundled_configs()
  width = max(map(len, configs)) + 2
  print('bundled configs (--config=NAME[:VARIANT]; ltd_jax/configs/NAME.py):')
  for name, line in configs.items():
    print(f'  {name:<{width}}{line}')


def print_help() -> None:
  print(USAGE)
  print('\nflags:\n' + flags.FLAGS.module_help(sys.modules[__name__]))
  print('\n--config.KEY=VALUE overrides any config value (keys: ltd_jax/config_lib.py).\n')
  print_config_list()


def parse_flags(argv):
  """Checks the config file and every --config.* key before absl parses (and compiles) anything."""
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
    print_help()
    sys.exit(0)
  if '--list-configs' in argv[1:]:
    print_config_list()
    sys.exit(0)
  spec = config_spec(argv)
  if spec is None:
    _fail('no config: pass --config=NAME (for example --config=trades_digits; '
          'ltd-jax --list-configs lists them) or --config=PATH.py')
  try:
    config_lib.check_override_keys(config_lib.load_config_file(spec), argv)
    argv = with_config_path(argv)
  except errors.LtdError as e:
    _fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def default_workdir(spec: str, checkpoint: str = 'auto') -> str:
  """workdirs/<config name>[_<variant>], and _<file name> for a PyTorch checkpoint."""
  path, variant = config_lib.split_config_spec(spec)
  name = os.path.splitext(os.path.basename(path))[0] + (f'_{variant}' if variant else '')
  if checkpoint.split(':')[0] not in ('auto', 'best', 'latest', 'ema'):
    name += '_' + os.path.splitext(os.path.basename(checkpoint))[0]
  return os.path.join('workdirs', name)


def main(argv):
  del argv
  if _MODE.value == 'compile':
    from ltd_jax import compile_plan  # pylint: disable=g-import-not-at-top
    compile_plan.enable_deviceless()
  from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
  from ltd_jax import runs  # pylint: disable=g-import-not-at-top
  from ltd_jax import train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(config_spec(sys.argv), _CHECKPOINT.value)
  try:
    if _MODE.value == 'compile':
      compile_plan.compile_and_report(config, workdir, runs.run_title(config))
      return
    parallel.initialize_distributed(config)
    if _MODE.value == 'train':
      train.train_and_evaluate(config, workdir)
    elif _MODE.value == 'evaluate':
      runs.evaluate_checkpoint(config, workdir, _CHECKPOINT.value)
    elif _MODE.value == 'export':
      from ltd_jax import export  # pylint: disable=g-import-not-at-top
      export.export_checkpoint(config, workdir, _CHECKPOINT.value)
    elif _MODE.value == 'autoattack':
      from ltd_jax import autoattack  # pylint: disable=g-import-not-at-top
      autoattack.autoattack_checkpoint(config, workdir, _CHECKPOINT.value)
    elif _MODE.value == 'audit':
      from ltd_jax import audit  # pylint: disable=g-import-not-at-top
      if not audit.audit_checkpoint(config, workdir, _CHECKPOINT.value)['passed']:
        print(f'work directory: {os.path.abspath(workdir)}')
        sys.exit(1)
    else:
      from ltd_jax import temperature_search  # pylint: disable=g-import-not-at-top
      temperature_search.ltd_temperature_search(config, workdir, train.train_and_evaluate)
  except errors.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # outside the training loop (start-up, final evaluation): no step lost
    print('interrupted (SIGINT) outside training: checkpoints already written stay valid; rerun '
          'the same command to go on', file=sys.stderr)
    sys.exit(130)
  except errors.LtdError as e:
    _fail(str(e))
  print(f'work directory: {os.path.abspath(workdir)}')


def run() -> None:
  """The ``ltd-jax`` console command (and ``python run.py``)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
