"""ABSLD on CIFAR-100: ResNet-18 student, temperatures bounded to [0.8, 3] (paper, ResNet-18 on
CIFAR-100), RSLAD's x10 loss scale for 100 classes; teacher stage trades_cifar100.py. The 'fair'
selection takes the worst 10% of classes in place of the worst class at 100 classes.

The paper's teacher is Gowal et al.'s WRN-70-16 (RobustBench Gowal2020Uncovering_70_16_extra,
CIFAR-100), DeepMind's SiLU WRN with input normalisation: with that checkpoint at PATH,
  --config.teacher.source=torch --config.teacher.path=PATH --config.teacher.model.name=dm-wrn-70-16
"""

from ltd_jax.configs import absld_cifar10


def get_config():
  c = absld_cifar10.get_config()
  c.data.name = 'cifar100'
  c.absld.tau_min = 0.8
  c.absld.tau_max = 3.0
  c.rslad.loss_scale = 10.0
  c.teacher.config = 'trades_cifar100'
  return c
