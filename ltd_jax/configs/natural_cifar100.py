"""Natural WRN-34-10 on CIFAR-100 (recipe of natural_cifar10.py): LTD's CIFAR-100 teacher."""

from ltd_jax.configs import natural_cifar10


def get_config():
  c = natural_cifar10.get_config()
  c.data.name = 'cifar100'
  return c
