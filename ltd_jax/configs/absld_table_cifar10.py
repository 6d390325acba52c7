"""Every row of the ABSLD paper's Table 1 (CIFAR-10, ResNet-18) and Table 6's Manual row:
``--config=configs/absld_table_cifar10.py:ROW`` (ROWS below), ``ROW_subset`` on the CIFAR-10
subset (absld_table_cifar10_subset.py names those for scripts/compare_methods.py --rows).

Each row is its method's setting as the ABSLD paper runs it (section 5.1, appendix A.3: ResNet-18
students, the WRN-34-10 TRADES teacher of trades_cifar10.py for the distillation rows, FRL as
Reweight + Remargin with threshold 0.05, CFA as TRADES + CFA, Fair-ARD on CIFAR-10) on its own
released schedule, attack and constants; every row selected as A.3 selects them, by the highest
avg + worst-class PGD-20 on the test split (``eval.selection='fair'``; each code's own selection
is ``--config.eval.selection=robust`` or ``last``, see docs/fidelity.md). Every row is
evaluated at eps 8/255.

- natural, pgd_at, trades: natural_cifar10.py, pgd_at_cifar10.py, trades_cifar10.py with a
  ResNet-18.
- rslad, absld: rslad_cifar10.py, absld_cifar10.py; absld_manual: ABSLD with tau 0.5 for bird,
  cat, deer, dog and 5 for the other classes, never updated (Table 6).
- adaad (boyellow/AdaAD, its README's CIFAR-10 command): eps 8/255, step 2/255, 10 steps, 200
  epochs, lr 0.1 / 10 at 100 and 150, wd 5e-4, alpha 1, KLDivLoss's elementwise mean. Its
  argparse defaults (eps 16/255, step 4/255) are the README's "larger search radius" command.
- frl (hannxu123/fair_robust frlrmrw.py): 40 epochs at lr 1e-3 (momentum 0.9, wd 5e-4) from a
  warm start, here this project's TRADES ResNet-18 (trades row, trained first in WORKDIR/init:
  the code loads a hot_start.pt whose training no script of the repository shows); 300 images
  per class held out; PGD-20 validation; tau 0.05 (A.3; the code's default 0.07).
- bat (BAT train.py, its only working arguments, the defaults): eps 0.031, step 0.007, 10 steps,
  beta 6, 200 epochs at 0.1 / 0.01 / 0.001 / 1e-4 from epochs 75, 90, 100 (1-indexed), wd 2e-4.
- cfa (PKU-ML/CFA train.py --mode TRADES --ccm --ccr, FAWA on): eps 8/255, step 2/255, 10 steps,
  beta 6, lambda 0.5 / 0.5 from epoch 10, FAWA decay 0.88 at threshold 0.24 on 100 held-out
  images per class under PGD-10, 200 epochs at lr 0.1 / 10 at 100 and 150, wd 5e-4.
- fair_ard (NISP-official/Fair-ARD Fair-ARD.py): ARD's train-mode attack from an unclipped
  uniform start, T = 30, alpha 1, class weights with beta 2; SGD with Nesterov, wd 2e-4, 200
  epochs; the code's lr decay takes effect once (0.1, then 0.01 from epoch 100: the shared
  adjust_learning_rate bug; ``--config.optim.lr_boundaries_epochs=100,150`` is the intended one).
- ard, iad (the distillation bases, not rows of the table): ARD main.py and IAD-I.py as above,
  with the table's ResNet-18 student and TRADES teacher (the codes' defaults: a MobileNetV2
  student for ARD, an adversarially trained ResNet-18 teacher for IAD).
- fair_rslad (Fair-RSLAD.py, the ABSLD table's Fair-ARD row on CIFAR-100: apply it with
  --config.data.name=cifar100 and absld_cifar100.py's teacher): RSLAD's attack, loss and
  schedule with kappa-weighted classes, Nesterov, no guard on kappa.
"""

from ltd_jax.configs import absld_cifar10
from ltd_jax.configs import natural_cifar10
from ltd_jax.configs import pgd_at_cifar10
from ltd_jax.configs import rslad_cifar10
from ltd_jax.configs import trades_cifar10
from ltd_jax import config_lib

ROWS = ('natural', 'pgd_at', 'trades', 'rslad', 'adaad', 'frl', 'bat', 'cfa', 'fair_ard', 'absld',
        'absld_manual')
EXTRA = ('ard', 'iad', 'fair_rslad')
CIFAR10_HARD_CLASSES = (2, 3, 4, 5)  # bird, cat, deer, dog


def _distillation(method: str, subset: bool):
  c = absld_cifar10.get_config('subset') if subset else rslad_cifar10.get_config()
  c.method = method
  if method == 'absld_manual':
    c.absld.manual_hard_classes = CIFAR10_HARD_CLASSES
  if method == 'absld' and not subset:
    return absld_cifar10.get_config()
  return c


def _ard_family(c, method: str):
  """ARD's attack and schedule (ARD main.py, IAD-I.py, Fair-ARD.py)."""
  c.method = method
  c.attack.bn_mode = 'train'
  c.attack.init = 'uniform_unclipped'
  c.ard.alpha = 1.0
  if method == 'iad':
    c.ard.temperature, c.ard.reduction = 1.0, 'batchmean'
  else:
    c.ard.temperature, c.ard.reduction = 30.0, 'elementwise_mean'
  if method == 'fair_ard':
    c.optim.nesterov = True
  return c


def _schedule(c, epochs: int, boundaries, weight_decay: float, subset: bool):
  """A code's schedule; on the subset, the subset's own (scaled) schedule is kept."""
  if not subset:
    c.num_epochs, c.optim.lr_boundaries_epochs = epochs, boundaries
    c.optim.weight_decay = weight_decay
    c.eval.every_epochs, c.eval.late_from_epoch = 10, 0
  return c


def _student_base(subset: bool):
  """A ResNet-18 run on CIFAR-10 (or the subset's width-8 small CNN, as absld_cifar10.py:subset's
  student) at eps 8/255."""
  c = trades_cifar10.get_config('subset') if subset else trades_cifar10.get_config()
  if subset:
    c.model.width = 8
  else:
    c.model.name = 'resnet18'
  c.eps = 8 / 255
  c.eval.eps = 8 / 255
  c.attack.alpha = 2 / 255
  return c


def get_config(variant='absld'):
  rows = ROWS + EXTRA
  config_lib.check_variant(variant, rows + tuple(f'{r}_subset' for r in rows))
  subset = variant.endswith('_subset')
  row = variant[:-len('_subset')] if subset else variant
  if row in ('natural', 'pgd_at'):
    c = (natural_cifar10 if row == 'natural' else pgd_at_cifar10).get_config() if not subset \
        else _student_base(True)
    c.method = row
    if not subset:
      c.model.name = 'resnet18'
    c.eval.during_training = ('clean', 'pgd20')  # every row selected alike (natural too)
    if row == 'pgd_at':
      c.attack.init = 'uniform'
  elif row == 'trades':
    c = _student_base(subset)
    if not subset:  # trades_cifar10.py's eps 0.031 / step 0.007 (trades.py)
      c.eps, c.attack.alpha = 0.031, 0.007
  elif row in ('rslad', 'absld', 'absld_manual'):
    c = _distillation(row, subset)
  elif row == 'adaad':
    c = _distillation('adaad', subset)
    c.adaad.alpha, c.adaad.reduction = 1.0, 'elementwise_mean'
    c.attack.init = 'normal'
    _schedule(c, 200, (100, 150), 5e-4, subset)
    if subset:  # RSLAD's x10 on the subset (absld_cifar10.py:subset): batchmean
      c.adaad.reduction = 'batchmean'
  elif row == 'fair_rslad':
    c = _distillation('rslad', subset)
    c.method = 'fair_rslad'
    c.optim.nesterov = True
    c.fair.kappa_guard = 0.0
    c.rslad.target_log_eps = 1e-5  # its kl_loss (the loss's value only)
  elif row in ('ard', 'iad', 'fair_ard'):
    c = _ard_family(_distillation(row, subset), row)
    _schedule(c, 200, (100,), 2e-4, subset)
    if row == 'iad':
      c.iad.beta, c.iad.begin_epoch = 0.1, (60 if not subset else 3)
  elif row == 'bat':
    c = _student_base(subset)
    c.method = 'bat'
    c.attack.init = 'normal_clipped'
    if not subset:
      c.eps, c.attack.alpha = 0.031, 0.007
    c.trades.beta = 6.0
    _schedule(c, 200, (74, 89, 99), 2e-4, subset)
  elif row == 'cfa':
    c = _student_base(subset)
    c.method = 'cfa'
    c.trades.beta = 6.0
    c.data.val_size = 1000 if not subset else 500
    c.cfa.begin_epoch = 10 if not subset else 2
    _schedule(c, 200, (100, 150), 5e-4, subset)
  else:  # frl
    c = _student_base(subset)
    c.method = 'frl'
    c.data.val_size = 3000 if not subset else 500
    c.init.source = 'train'
    c.init.config = ('absld_table_cifar10:trades_subset' if subset
                     else 'absld_table_cifar10:trades')
    c.num_epochs = 40 if not subset else 4
    c.optim.lr, c.optim.momentum, c.optim.weight_decay = 1e-3, 0.9, 5e-4
    c.optim.lr_boundaries_epochs = ()
    c.frl.tau_nat = c.frl.tau_bndy = 0.05
    c.frl.rate1_halve_every = 40 if not subset else 4
    c.eval.every_epochs, c.eval.late_from_epoch = (5 if not subset else 1), 0
  c.eval.selection = 'fair'
  c.eval.eps = 8 / 255
  if not subset:
    c.eval.subset_size = 0  # every row selected on the whole test set (rslad_cifar10.py's)
  return c
