"""LTD on TRADES-AWP, CIFAR-10, WRN-34-20 student (teacher: natural WRN-34-10)."""

from ltd_jax.configs import ltd_awp_cifar10


def get_config():
  c = ltd_awp_cifar10.get_config()
  c.model.name = 'wrn-34-20'
  return c
