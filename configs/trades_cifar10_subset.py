"""TRADES on the real CIFAR-10 subset (5,085 train / 1,017 test images) with a 16-wide small CNN:
the robust teacher of absld_cifar10_subset.py, sized for 2 CPU cores (about 4 minutes).

eps 8/255 as in the papers; the training attack is shortened to 5 steps of 2/255 for speed.
Point --config.data.dir at a folder holding cifar-10-batches-py (the full archive works too).
"""

from ltd_jax import config_lib


def get_config():
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
