"""ABSLD on Tiny-ImageNet (ABSLD paper A.5): PreActResNet-18 student, TRADES PreActResNet-34
teacher (stage configs/trades_tinyimagenet.py), temperatures bounded to [0.9, 1.1], 100
epochs, otherwise the CIFAR-100 settings (RSLAD x10 loss scale); worst-10% classes reported,
as the paper does for 200 classes of 50 test images."""

from ltd_jax.configs import absld_cifar100


def get_config():
  c = absld_cifar100.get_config()
  c.data.name = 'tiny_imagenet'
  c.model.name = 'preactresnet18'
  c.num_epochs = 100
  c.optim.lr_boundaries_epochs = (75, 90)
  c.absld.tau_min = 0.9
  c.absld.tau_max = 1.1
  c.teacher.config = 'trades_tinyimagenet'
  return c
