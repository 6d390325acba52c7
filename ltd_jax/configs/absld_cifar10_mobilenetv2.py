"""ABSLD on CIFAR-10 with the MobileNetV2 student of the paper's Table 2 (same teacher and recipe)."""

from ltd_jax.configs import absld_cifar10


def get_config():
  c = absld_cifar10.get_config()
  c.model.name = 'mobilenetv2'
  return c
