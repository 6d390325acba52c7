"""ltd_jax command line: ``python run.py --config=configs/NAME.py [--config.a.b=v] [--workdir=DIR]``.

Modes: ``train`` (resumes from the work directory's latest checkpoint, then evaluates the
selected checkpoint with every attack), ``evaluate`` (evaluates a saved checkpoint, or a PyTorch
file given as --checkpoint), ``export`` (writes the checkpoint as a PyTorch state_dict),
``autoattack`` (runs the official AutoAttack on the exported model and adds it to the results),
``audit`` (the gradient-masking audit of a checkpoint; exit status 1 when it finds signs of
masking) and ``temperature_search`` (LTD's two-step search of the teacher temperature).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ltd_jax import config_lib
from ltd_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file: configs/NAME.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory (default: workdirs/<config name>).')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'evaluate', 'export', 'autoattack', 'audit', 'temperature_search'],
    'train; evaluate, export, AutoAttack or audit (gradient masking) a checkpoint; or LTD\'s '
    'teacher-temperature search.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'auto', 'evaluate / export / autoattack / audit: auto (best if kept, else latest), '
    'best, latest, or the path of a PyTorch .pt/.pth/.safetensors file of config.model.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """Checks the config file and every --config.* key before absl parses (and compiles) anything."""
  config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_path is None:
    _fail('no config: pass --config=configs/NAME.py (for example configs/trades_digits.py)')
  try:
    config_lib.check_override_keys(config_lib.load_config_file(config_path), argv)
  except errors.LtdError as e:
    _fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def default_workdir(config_path: str, checkpoint: str = 'auto') -> str:
  """workdirs/<config name>, or workdirs/<config name>_<file name> for a PyTorch checkpoint."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  if checkpoint not in ('auto', 'best', 'latest'):
    name += '_' + os.path.splitext(os.path.basename(checkpoint))[0]
  return os.path.join('workdirs', name)


def main(argv):
  del argv
  from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
  from ltd_jax import runs  # pylint: disable=g-import-not-at-top
  from ltd_jax import train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']), _CHECKPOINT.value)
  try:
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


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
