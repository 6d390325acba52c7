"""ltd_jax command line: ``python run.py --config=configs/NAME.py [--config.a.b=v] [--workdir=DIR]``
(the same as the installed ``ltd-jax`` command; ``--help`` lists the modes). See ltd_jax/cli.py."""

from ltd_jax.cli import default_workdir, main, parse_flags, run  # pylint: disable=unused-import

__all__ = ['default_workdir', 'main', 'parse_flags', 'run']  # tests drive run.parse_flags / main

if __name__ == '__main__':
  run()
