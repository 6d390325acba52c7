"""RSLAD (Zi et al. 2021) on CIFAR-10: ResNet-18 student, WRN-34-10 TRADES teacher.

SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 300 epochs, lr / 10 at 215, 260, 285; attack
10 x 2/255 on KL(teacher || student) from x + 0.001 N(0, 1); loss 5/6 KL(t(x) || f(x_adv)) +
1/6 KL(t(x) || f(x)), elementwise mean, teacher temperature 1. The teacher stage trains
configs/trades_cifar10.py in WORKDIR/teacher unless --config.teacher.source=workdir points at one.
Checkpoint selection as the ABSLD paper selects its baselines and the released ABSLD script
selects: 'fair' (avg + worst-class PGD-20) on the whole test set, every 10 epochs before epoch
215 and every epoch from 215.
"""

from ltd_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.method = 'rslad'
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.model.name = 'resnet18'
  c.num_epochs = 300
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 2e-4
  c.optim.lr_boundaries_epochs = (215, 260, 285)
  c.attack.alpha = 2 / 255
  c.attack.steps = 10
  c.attack.init = 'normal'
  c.rslad.alpha = 5 / 6
  c.rslad.reduction = 'elementwise_mean'
  c.teacher.source = 'train'
  c.teacher.config = 'trades_cifar10'
  c.eval.selection = 'fair'
  c.eval.subset_size = 0
  c.eval.every_epochs = 10
  c.eval.late_from_epoch = 215
  c.eval.late_every_epochs = 1
  return c
