"""LTD (TRADES base, T_t = 5) on the CIFAR-10 subset with natural_cifar10_subset.py as teacher stage."""

from configs import trades_cifar10_subset


def get_config():
  c = trades_cifar10_subset.get_config()
  c.method = 'ltd'
  c.ltd.base = 'trades'
  c.ltd.teacher_temperature = 5.0
  c.teacher.source = 'train'
  c.teacher.config = 'configs/natural_cifar10_subset.py'
  return c
