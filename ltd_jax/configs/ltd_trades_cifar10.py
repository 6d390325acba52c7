"""LTD on TRADES, CIFAR-10: WRN-34-10 student, naturally trained WRN-34-10 teacher at T_t = 5.

LTD paper settings: 120 epochs, SGD lr 0.1 / 10 at 80 and 100, momentum 0.9, Nesterov, wd 5e-4,
batch 128, lambda (= beta) 6, T_s = 1; attack "PGD-8" (appendix A.1), read as 8 steps of 2/255
from x + 0.001 N(0, 1) on the student, as "PGD-6" is 6 steps in ltd_imagenet_resnet50.py and
"PGD-20" 20 steps in every paper of this field (docs/fidelity.md; the AWP code's default is 10:
--config.attack.steps=10).
The teacher stage trains configs/natural_cifar10.py in WORKDIR/teacher.
"""

from ltd_jax.configs import trades_cifar10
from ltd_jax import config_lib


def get_config(variant=None):
  """The paper setting, or ``variant='subset'``: LTD (TRADES base, T_t = 5) on the CIFAR-10
  subset with natural_cifar10.py:subset as teacher stage."""
  if variant == 'subset':
    c = trades_cifar10.subset_config()
    c.method = 'ltd'
    c.ltd.base = 'trades'
    c.ltd.teacher_temperature = 5.0
    c.teacher.source = 'train'
    c.teacher.config = 'natural_cifar10:subset'
    return c
  config_lib.check_variant(variant, ('subset',))
  c = config_lib.default_config()
  c.method = 'ltd'
  c.ltd.base = 'trades'
  c.ltd.teacher_temperature = 5.0
  c.ltd.student_temperature = 1.0
  c.trades.beta = 6.0
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.model.name = 'wrn-34-10'
  c.num_epochs = 120
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.lr_boundaries_epochs = (80, 100)
  c.attack.alpha = 2 / 255
  c.attack.steps = 8
  c.attack.init = 'normal'
  c.teacher.source = 'train'
  c.teacher.config = 'natural_cifar10'
  c.eval.selection = 'robust'
  c.reference_bn_passes = True  # running statistics as the TRADES code's clean, adv, clean
  return c
