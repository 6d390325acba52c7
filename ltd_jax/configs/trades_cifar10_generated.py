"""TRADES on CIFAR-10 with 1M generated images and an EMA, WRN-28-10 (SiLU), as Wang et al. 2023 run it.

wzekai99/DM-Improves-AT ``train-wa.py`` with its README's command (``--batch-size 512 --model
wrn-28-10-swish --num-adv-epochs 400 --lr 0.2 --beta 5.0 --unsup-fraction 0.7 --ls 0.1
--aux-data-filename edm_data/cifar10/1m.npz``) and its parser's defaults: SGD with Nesterov
momentum 0.9, weight decay 5e-4 on every parameter but BatchNorm's, the ``cosinew`` schedule
(OneCycleLR, 2.5% warm-up, stepped once per epoch, momentum cycled 0.95 -> 0.85 -> 0.95),
BatchNorm momentum 0.01, TRADES attack of 10 steps of 2/255 at eps 8/255 from a uniform start
in train mode without updating the running statistics, label smoothing 0.1 on the natural term,
an EMA with tau 0.995 and a 2.5% warm-up, selected on 1,024 training images held out.

Point it at the published archive (download ``cifar10/1m.npz`` from the DM-Improves-AT README's
table; several shards: a glob or comma-separated paths)::

    python run.py --config=configs/trades_cifar10_generated.py --config.data.generated_path=1m.npz

``:ltd`` adds LTD (a naturally trained teacher's soft labels at T = 5 in the natural term) and
``:absld`` ABSLD (a robust WRN-34-10 TRADES teacher, per-class temperatures) to the same recipe;
both query the teacher on the generated images as on the real ones. ``:subset`` is the recipe
on the CIFAR-10 subset with a small CNN, for a CPU.
"""

from ltd_jax import config_lib
from ltd_jax.configs import absld_cifar10

VARIANTS = ('ltd', 'absld', 'subset')


def get_config(variant=None):
  config_lib.check_variant(variant, VARIANTS)
  c = config_lib.default_config()
  c.method = 'trades'
  c.eps = 8 / 255
  c.data.name = 'cifar10'
  c.data.generated_required = True  # the recipe is not this one without its generated images
  c.data.generated_fraction = 0.7
  c.data.val_size = 1024  # the code's eval set: 1,024 training images held out
  c.model.name = 'dm-wrn-28-10'
  c.model.bn_momentum = 0.01
  c.num_epochs = 400
  c.batch_size = 512
  c.optim.lr = 0.2
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.weight_decay_batchnorm = False
  c.optim.schedule = 'cosine'
  c.optim.cosine_warmup_fraction = 0.025
  c.optim.cosine_per = 'epoch'
  c.optim.cycle_momentum = (0.85, 0.95)
  c.attack.alpha = 2 / 255
  c.attack.steps = 10
  c.attack.init = 'uniform'
  c.attack.bn_mode = 'batch'
  c.trades.beta = 5.0
  c.trades.label_smoothing = 0.1
  c.ema.decay = 0.995
  c.ema.warmup_fraction = 0.025
  c.ema.dynamic_decay = True
  c.eval.selection = 'robust'
  c.eval.selection_split = 'val'
  c.eval.subset_size = 1024
  c.eval.every_epochs = 1
  if variant == 'subset':
    _subset(c)
  elif variant == 'ltd':
    c.method = 'ltd'
    c.ltd.base = 'trades'
    c.ltd.teacher_temperature = 5.0
    c.teacher.source = 'train'
    c.teacher.config = 'natural_cifar10'
  elif variant == 'absld':
    c.method = 'absld'
    paper = absld_cifar10.get_config()  # ABSLD's own settings: temperatures, RSLAD's loss, teacher
    c.absld, c.rslad = paper.absld, paper.rslad
    # The cosine lr has no milestones: the temperatures' step decays at ABSLD's (215, 260, 285
    # of 300 epochs) scaled to 400.
    c.optim.lr_boundaries_epochs = (287, 347, 380)
    c.teacher.source, c.teacher.config = paper.teacher.source, paper.teacher.config
    c.eval.selection = paper.eval.selection
  return c


def _subset(c):
  """The recipe at CPU size: CIFAR-10 subset, a 16-wide small CNN, 8 epochs, batch 128, 5-step
  attack; the generated images still come from ``data.generated_path``."""
  c.data.dir = '../shared/data/cifar-10-subset'
  c.data.val_size = 500
  c.model.name = 'small_cnn'
  c.model.width = 16
  c.model.bn_momentum = 0.1
  c.num_epochs = 8
  c.batch_size = 128
  c.optim.lr = 0.1
  c.optim.cosine_warmup_fraction = 0.25
  c.attack.steps = 5
  c.eval.subset_size = 500
  c.log_every_steps = 10
