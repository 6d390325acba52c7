"""LTD on TRADES-AWP, CIFAR-100, WRN-34-10 student, natural WRN-34-10 CIFAR-100 teacher, T_t = 5."""

from ltd_jax.configs import ltd_awp_cifar10


def get_config():
  c = ltd_awp_cifar10.get_config()
  c.data.name = 'cifar100'
  c.teacher.config = 'natural_cifar100'
  return c
