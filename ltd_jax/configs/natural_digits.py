"""Natural training (cross-entropy only) on digits: the undefended baseline for trades_digits."""

from ltd_jax.configs import trades_digits


def get_config():
  c = trades_digits.get_config()
  c.method = 'natural'
  c.eval.selection = 'last'
  return c
