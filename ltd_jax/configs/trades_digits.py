"""TRADES (beta = 6) on scikit-learn's real 8x8 digits with a small CNN: minutes on 2 CPU cores.

eps = 0.2 on [0, 1] pixels: a naturally trained model of the same architecture falls to a
few percent PGD-20 accuracy at this radius (README), so robustness here is not for free.
"""

from ltd_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.method = 'trades'
  c.eps = 0.2
  c.data.name = 'digits'
  c.model.name = 'small_cnn'
  c.model.width = 32
  c.num_epochs = 30
  c.batch_size = 64
  c.optim.lr = 0.05
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.lr_boundaries_epochs = (20, 25)
  c.attack.alpha = 0.04
  c.attack.steps = 10
  c.attack.init = 'normal'
  c.eval.every_epochs = 5
  c.eval.subset_size = 0
  c.eval.selection = 'robust'
  c.eval.alpha = 0.02
  c.log_every_steps = 10
  return c
