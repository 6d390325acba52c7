"""Natural ResNet-50 on ImageNet: the LTD teacher (LTD paper A.2: teacher and student share the
architecture and the recipe; trained from scratch on one-hot labels; [0, 1] pixels, no
mean/std normalisation). 90 epochs, SGD lr 0.1 / 10 at 50, Nesterov, wd 1e-4, batch 320."""

from ltd_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.method = 'natural'
  c.eps = 4 / 255
  c.data.name = 'imagenet'
  c.data.image_size = 224
  c.model.name = 'resnet50'
  c.num_epochs = 90
  c.batch_size = 320
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4
  c.optim.lr_boundaries_epochs = (50,)
  c.eval.during_training = ('clean',)
  c.eval.final = ('clean',)
  c.eval.subset_size = 5000
  c.eval.batch_size = 256
  c.eval.selection = 'last'
  c.checkpoint.every_steps = 1000
  return c
