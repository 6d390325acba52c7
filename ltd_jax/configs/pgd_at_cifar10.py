"""PGD-AT (Madry et al. 2018) on CIFAR-10 with WRN-34-10, with the recipe of Rice et al. (2020).

SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, 200 epochs with lr / 10 at 100 and 150;
training attack: PGD-10, alpha 2/255, eps 8/255, uniform init, cross-entropy. Robust
overfitting makes checkpoint selection by PGD-20 ('robust', i.e. early stopping) essential.
"""

from ltd_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.method = 'pgd_at'
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.model.name = 'wrn-34-10'
  c.num_epochs = 200
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.lr_boundaries_epochs = (100, 150)
  c.attack.alpha = 2 / 255
  c.attack.steps = 10
  c.attack.init = 'uniform'
  c.eval.selection = 'robust'
  return c
