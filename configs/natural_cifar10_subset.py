"""Natural training on the CIFAR-10 subset (small CNN, width 16): LTD's teacher in ltd_cifar10_subset.py."""

from configs import trades_cifar10_subset


def get_config():
  c = trades_cifar10_subset.get_config()
  c.method = 'natural'
  c.eval.during_training = ('clean',)
  c.eval.selection = 'last'
  return c
