"""TRADES WRN-34-10 on CIFAR-100 (the recipe of trades_cifar10.py): the default robust teacher of
absld_cifar100.py. The ABSLD paper distils from Gowal et al.'s WRN-70-16 instead, a different
(SiLU, normalised) architecture that needs the PyTorch import of the interchange issue."""

from ltd_jax.configs import trades_cifar10


def get_config():
  c = trades_cifar10.get_config()
  c.data.name = 'cifar100'
  return c
