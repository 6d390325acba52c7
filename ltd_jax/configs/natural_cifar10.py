"""Natural training of WRN-34-10 on CIFAR-10: LTD's teacher (the paper's reaches >= 94.5% clean).

SGD lr 0.1, momentum 0.9, Nesterov, wd 5e-4, batch 128, 200 epochs with lr / 10 at 100 and 150,
crop + flip augmentation. Selection is the last checkpoint; the final table still reports
FGSM / PGD-20 / CW to show the model is not robust.
"""

from ltd_jax.configs import trades_cifar10
from ltd_jax import config_lib


def get_config(variant=None):
  """The paper setting, or ``variant='subset'``: natural training on the CIFAR-10 subset (small
  CNN, width 16), LTD's teacher in ltd_trades_cifar10.py:subset."""
  if variant == 'subset':
    c = trades_cifar10.subset_config()
    c.method = 'natural'
    c.eval.during_training = ('clean',)
    c.eval.selection = 'last'
    return c
  config_lib.check_variant(variant, ('subset',))
  c = config_lib.default_config()
  c.method = 'natural'
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.model.name = 'wrn-34-10'
  c.num_epochs = 200
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.lr_boundaries_epochs = (100, 150)
  c.eval.during_training = ('clean',)
  c.eval.selection = 'last'
  return c
