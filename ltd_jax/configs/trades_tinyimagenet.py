"""TRADES PreActResNet-34 on Tiny-ImageNet: the ABSLD teacher (ABSLD paper A.5 / Table 7).
CIFAR-100 recipe (wd 2e-4, lr 0.1, batch 128, 10 x 2/255 attack, eps 8/255, beta 6), 100
epochs with lr / 10 at 75 and 90; 64x64 images, random crop (padding 4) and flip."""

from ltd_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.method = 'trades'
  c.reference_bn_passes = True  # running statistics as trades.py's clean, adv, clean forwards
  c.eps = 8 / 255
  c.data.name = 'tiny_imagenet'
  c.model.name = 'preactresnet34'
  c.num_epochs = 100
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 2e-4
  c.optim.lr_boundaries_epochs = (75, 90)
  c.attack.alpha = 2 / 255
  c.attack.steps = 10
  c.trades.beta = 6.0
  c.eval.selection = 'robust'
  return c
