"""TRADES (Zhang et al. 2019) on CIFAR-10 with WRN-34-10, as in the reference train_trades_cifar10.py.

SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 76 epochs with lr / 10 from (1-indexed) epoch 75;
training attack: 10 steps of 0.007, eps 0.031, init x + 0.001 N(0, 1); beta = 6. Evaluated at
eps 8/255, as every model of a cross-method table (eval.eps).
"""

from ltd_jax import config_lib


def get_config(variant=None):
  """The paper setting, or ``variant='subset'`` (``--config=configs/trades_cifar10.py:subset``)."""
  if variant == 'subset':
    return subset_config()
  config_lib.check_variant(variant, ('subset',))
  c = config_lib.default_config()
  c.method = 'trades'
  c.eps = 0.031
  c.eval.eps = 8 / 255
  c.data.name = 'cifar10'
  c.model.name = 'wrn-34-10'
  c.num_epochs = 76
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 2e-4
  c.optim.lr_boundaries_epochs = (74, 89, 99)
  c.attack.alpha = 0.007
  c.attack.steps = 10
  c.attack.init = 'normal'
  c.trades.beta = 6.0
  c.eval.selection = 'robust'
  c.reference_bn_passes = True  # running statistics as trades.py's clean, adv, clean forwards
  return c


def subset_config():
  """TRADES on the real CIFAR-10 subset (5,085 train / 1,017 test images) with a 16-wide small CNN:
  the robust teacher of absld_cifar10.py:subset, sized for 2 CPU cores (about 4 minutes).

  eps 8/255 as in the papers; the training attack is shortened to 5 steps of 2/255 for speed.
  Point --config.data.dir at a folder holding cifar-10-batches-py (the full archive works too)."""
  c = config_lib.default_config()
  c.method = 'trades'
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.data.dir = '../shared/data/cifar-10-subset'
  c.model.name = 'small_cnn'
  c.model.width = 16
  c.num_epochs = 8
  c.batch_size = 128
  c.optim.lr = 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.lr_boundaries_epochs = (6, 7)
  c.attack.alpha = 2 / 255
  c.attack.steps = 5
  c.attack.init = 'normal'
  c.eval.every_epochs = 4
  c.eval.subset_size = 500
  c.eval.selection = 'robust'
  c.log_every_steps = 10
  return c
