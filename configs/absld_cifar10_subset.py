"""ABSLD on the CIFAR-10 subset: trades_cifar10_subset.py as teacher stage (width 16), a half-width
student; the paper's temperature rule and bounds, RSLAD's x10 loss scale as in absld_digits.py,
fair checkpoint selection. About 8 minutes on 2 CPU cores, teacher included."""

from configs import trades_cifar10_subset


def get_config():
  c = trades_cifar10_subset.get_config()
  c.method = 'absld'
  c.model.width = 8
  c.rslad.alpha = 5 / 6
  c.rslad.reduction = 'elementwise_mean'
  c.rslad.loss_scale = 10.0
  c.absld.beta = 0.1
  c.absld.tau_min = 0.5
  c.absld.tau_max = 5.0
  c.teacher.source = 'train'
  c.teacher.config = 'configs/trades_cifar10_subset.py'
  c.eval.selection = 'fair'
  return c
