"""What every benchmark prints: the machine, and the table (also to ``--out``)."""

import os
import platform
import sys

import jax


def machine_name() -> str:
  dev = jax.devices()[0]
  if dev.platform != 'cpu':
    return f'{jax.device_count()} x {dev.device_kind} ({dev.platform})'
  cpu = platform.processor() or 'CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{cpu}, {os.cpu_count()} cores, {jax.device_count()} JAX CPU device(s)'


def header_lines() -> list[str]:
  """The machine (with the jax version) and the command line that produced the table."""
  script = os.path.relpath(os.path.abspath(sys.argv[0]))
  return [f'machine: {machine_name()}; jax {jax.__version__}',
          f'command: python {script} {" ".join(sys.argv[1:])}']


def write_table(lines: list[str], out: str) -> None:
  """Writes the lines to the Markdown file ``out``."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def emit_table(lines: list[str], out: str = '') -> None:
  """Prints the lines; with ``out``, also writes them to that Markdown file."""
  print('\n'.join(lines))
  if out:
    write_table(lines, out)
