"""Every paper-scale distillation config starts and runs a step on the real CIFAR subsets, with its
real student architecture and a small stand-in teacher (the teacher configs run in test_configs)."""

import json
import os

import pytest

from ltd_jax import config_lib
from ltd_jax import train
from tests.conftest import ROOT, shared_path


def _data_dir(name):
  folder = {'cifar10': ('cifar-10-subset', 'cifar-10-batches-py'),
            'cifar100': ('cifar-100-subset', 'cifar-100-python')}[name]
  return os.path.dirname(shared_path('data', *folder))


@pytest.fixture(scope='module')
def stand_in_teachers(tmp_path_factory):
  teachers = {}
  for name in ('cifar10', 'cifar100'):
    c = config_lib.default_config()
    c.method, c.data.name, c.data.dir = 'natural', name, _data_dir(name)
    c.model.name, c.model.width = 'small_cnn', 4
    c.batch_size, c.max_steps = 16, 2
    c.eval.selection, c.eval.final, c.eval.final_subset_size = 'last', ('clean',), 20
    c.progress_bar = False
    workdir = str(tmp_path_factory.mktemp(f'teacher_{name}'))
    train.train_and_evaluate(c, workdir)
    teachers[name] = workdir
  return teachers


# The suite's time on 2 cores: the WRN-34-x steps and MobileNetV2's are slow (half a minute or
# more of compilation each); their fast equivalents run by default: LTD-AWP's config on a
# WRN-10-1 (the same step on the same WideResNet code, 1 block per group), and MobileNetV2's
# forward and BatchNorm modes in test_models / its PyTorch layout in test_interchange.
@pytest.mark.parametrize('name,method,model,epochs,student', [
    ('absld_cifar10', 'absld', 'resnet18', 300, None),
    pytest.param('absld_cifar10_mobilenetv2', 'absld', 'mobilenetv2', 300, None,
                 marks=pytest.mark.slow),
    ('absld_cifar100', 'absld', 'resnet18', 300, None),
    ('rslad_cifar10', 'rslad', 'resnet18', 300, None),
    # ltd_awp_cifar10 derives from ltd_trades_cifar10 and runs the same LTD step plus AWP.
    pytest.param('ltd_trades_cifar10', 'ltd', 'wrn-34-10', 120, None, marks=pytest.mark.slow),
    pytest.param('ltd_awp_cifar10', 'ltd', 'wrn-34-10', 120, None, marks=pytest.mark.slow),
    ('ltd_awp_cifar10', 'ltd', 'wrn-34-10', 120, 'wrn-10-1'),
    pytest.param('ltd_awp_cifar10_wrn34_20', 'ltd', 'wrn-34-20', 120, None,
                 marks=pytest.mark.slow),
    pytest.param('ltd_awp_cifar100', 'ltd', 'wrn-34-10', 120, None, marks=pytest.mark.slow),
])
def test_paper_distillation_config_runs_a_step(name, method, model, epochs, student,
                                                stand_in_teachers, tmp_path):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert (config.method, config.model.name, config.num_epochs) == (method, model, epochs)
  if student:
    config.model.name = student
  assert config.teacher.source == 'train' and os.path.isfile(config_lib.resolve_config_spec(config.teacher.config)[0])
  config.data.dir = _data_dir(config.data.name)
  config.teacher.source, config.teacher.path = 'workdir', stand_in_teachers[config.data.name]
  config.batch_size, config.max_steps, config.attack.steps = 2, 1, 1
  config.awp.warmup_epochs = 0  # exercise the weight perturbation in the one step
  config.eval.final, config.eval.final_subset_size, config.eval.batch_size = ('clean',), 4, 4
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  record = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"train"' in l][0]
  assert record['loss'] == record['loss'] and record['loss'] > 0


_ABSLD = {  # ABSLD paper (section 5.1, appendix A.3) and the released resnet18_absld_cifar10.py
    'method': 'absld', 'model.name': 'resnet18', 'data.name': 'cifar10', 'eps': 8 / 255,
    'num_epochs': 300, 'batch_size': 128, 'optim.lr': 0.1, 'optim.momentum': 0.9,
    'optim.nesterov': False, 'optim.weight_decay': 2e-4,
    'optim.lr_boundaries_epochs': (215, 260, 285), 'optim.lr_decay': 0.1,
    'optim.warmup_epochs': 0.0, 'attack.alpha': 2 / 255, 'attack.steps': 10,
    'attack.init': 'normal', 'attack.bn_mode': 'eval', 'rslad.alpha': 5 / 6,
    'rslad.reduction': 'elementwise_mean', 'rslad.loss_scale': 1.0, 'absld.tau_init': 1.0,
    'absld.beta': 0.1, 'absld.tau_min': 0.5, 'absld.tau_max': 5.0,
    'absld.released_code_aliasing': False, 'eval.selection': 'fair', 'eval.subset_size': 0,
    'eval.selection_split': 'test', 'eval.every_epochs': 10, 'eval.late_from_epoch': 215,
    'eval.late_every_epochs': 1, 'eval.pgd_steps': 20, 'eval.alpha': 2 / 255,
    'eval.cw_steps': 30, 'eval.cw_kappa': 50.0, 'eval.eps': None,
    'teacher.config': 'trades_cifar10', 'reference_bn_passes': False,
}
_LTD = {  # LTD paper (section 5, appendix A.1) on the AWP code's TRADES recipe
    'method': 'ltd', 'ltd.base': 'trades', 'model.name': 'wrn-34-10', 'data.name': 'cifar10',
    'eps': 8 / 255, 'num_epochs': 120, 'batch_size': 128, 'optim.lr': 0.1, 'optim.momentum': 0.9,
    'optim.nesterov': True, 'optim.weight_decay': 5e-4, 'optim.lr_boundaries_epochs': (80, 100),
    'optim.lr_decay': 0.1, 'trades.beta': 6.0, 'ltd.teacher_temperature': 5.0,
    'ltd.student_temperature': 1.0, 'attack.steps': 8, 'attack.alpha': 2 / 255,
    'attack.init': 'normal', 'eval.selection': 'robust', 'reference_bn_passes': True,
    'teacher.config': 'natural_cifar10',
}
_LTD_AWP = {**_LTD, 'ltd.base': 'awp', 'awp.gamma': 0.005, 'awp.warmup_epochs': 10,
            'awp.proxy_lr': 0.1, 'awp.proxy_loss': 'trades'}
PUBLISHED = {
    'absld_cifar10': _ABSLD,
    'absld_cifar10_mobilenetv2': {**_ABSLD, 'model.name': 'mobilenetv2'},
    'absld_cifar100': {**_ABSLD, 'data.name': 'cifar100', 'absld.tau_min': 0.8,
                       'absld.tau_max': 3.0, 'rslad.loss_scale': 10.0,
                       'teacher.config': 'trades_cifar100'},
    'absld_tinyimagenet': {'method': 'absld', 'data.name': 'tiny_imagenet',
                           'model.name': 'preactresnet18', 'num_epochs': 100,
                           'absld.tau_min': 0.9, 'absld.tau_max': 1.1,
                           'teacher.config': 'trades_tinyimagenet'},
    'rslad_cifar10': {k: v for k, v in {**_ABSLD, 'method': 'rslad'}.items()
                      if not k.startswith('absld.')},
    'trades_cifar10': {  # train_trades_cifar10.py, evaluated at 8/255 as every table's model
        'method': 'trades', 'model.name': 'wrn-34-10', 'eps': 0.031, 'eval.eps': 8 / 255,
        'attack.alpha': 0.007, 'attack.steps': 10, 'attack.init': 'normal', 'trades.beta': 6.0,
        'num_epochs': 76, 'batch_size': 128, 'optim.lr': 0.1, 'optim.momentum': 0.9,
        'optim.nesterov': False, 'optim.weight_decay': 2e-4,
        'optim.lr_boundaries_epochs': (74, 89, 99), 'eval.selection': 'robust',
        'reference_bn_passes': True},
    'trades_cifar10_generated': {  # DM-Improves-AT README command + train-wa.py parser defaults
        'method': 'trades', 'model.name': 'dm-wrn-28-10', 'data.name': 'cifar10', 'eps': 8 / 255,
        'batch_size': 512, 'num_epochs': 400, 'optim.lr': 0.2, 'trades.beta': 5.0,
        'data.generated_fraction': 0.7, 'data.generated_required': True,
        'trades.label_smoothing': 0.1, 'optim.weight_decay': 5e-4, 'optim.momentum': 0.9,
        'optim.nesterov': True, 'optim.schedule': 'cosine', 'optim.cosine_warmup_fraction': 0.025,
        'optim.cosine_initial_div': 25.0, 'optim.cosine_final_div': 1e4,
        'optim.cosine_per': 'epoch', 'optim.cycle_momentum': (0.85, 0.95),
        'optim.weight_decay_batchnorm': False, 'model.bn_momentum': 0.01,
        'attack.alpha': 2 / 255, 'attack.steps': 10, 'attack.init': 'uniform',
        'attack.bn_mode': 'batch', 'ema.decay': 0.995, 'ema.warmup_fraction': 0.025,
        'ema.dynamic_decay': True, 'data.val_size': 1024, 'eval.selection_split': 'val',
        'reference_bn_passes': False},
    'pgd_at_cifar10': {  # Rice et al.'s PGD-AT recipe
        'method': 'pgd_at', 'model.name': 'wrn-34-10', 'eps': 8 / 255, 'num_epochs': 200,
        'optim.lr': 0.1, 'optim.weight_decay': 5e-4, 'optim.lr_boundaries_epochs': (100, 150),
        'attack.alpha': 2 / 255, 'attack.steps': 10, 'attack.init': 'uniform',
        'eval.selection': 'robust'},
    'ltd_trades_cifar10': _LTD,
    'ltd_awp_cifar10': _LTD_AWP,
    'ltd_awp_cifar10_wrn34_20': {**_LTD_AWP, 'model.name': 'wrn-34-20'},
    'ltd_awp_cifar100': {**_LTD_AWP, 'data.name': 'cifar100',
                         'teacher.config': 'natural_cifar100'},
    'ltd_imagenet_resnet50': {  # LTD appendix A.1: ImageNet
        'method': 'ltd', 'model.name': 'resnet50', 'data.name': 'imagenet', 'eps': 4 / 255,
        'num_epochs': 90, 'batch_size': 320, 'optim.lr': 0.1, 'optim.momentum': 0.9,
        'optim.nesterov': True, 'optim.weight_decay': 1e-4, 'optim.lr_boundaries_epochs': (50,),
        'attack.steps': 6, 'ltd.teacher_temperature': 5.0, 'trades.beta': 6.0,
        'eval.final_subset_size': 5000, 'reference_bn_passes': True,
        'teacher.config': 'natural_imagenet_resnet50'},
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_paper_config_holds_every_published_setting(name):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  for key, want in PUBLISHED[name].items():
    got = config
    for part in key.split('.'):
      got = got[part]
    if isinstance(want, float):
      assert got == pytest.approx(want, rel=1e-9), key
    else:
      assert (tuple(got) if isinstance(got, (list, tuple)) else got) == want, key


# Each baseline row of the ABSLD table as its released code runs it (docs/fidelity.md).
_TABLE_ROWS = {
    'adaad': {'method': 'adaad', 'eps': 8 / 255, 'attack.alpha': 2 / 255, 'attack.steps': 10,
              'attack.init': 'normal', 'attack.bn_mode': 'eval', 'num_epochs': 200,
              'optim.lr_boundaries_epochs': (100, 150), 'optim.weight_decay': 5e-4,
              'adaad.alpha': 1.0, 'adaad.reduction': 'elementwise_mean', 'teacher.source': 'train'},
    'fair_ard': {'method': 'fair_ard', 'attack.bn_mode': 'train',
                 'attack.init': 'uniform_unclipped', 'ard.temperature': 30.0, 'ard.alpha': 1.0,
                 'ard.reduction': 'elementwise_mean', 'fair.beta': 2.0, 'fair.clip_min': 5 / 6,
                 'fair.clip_max': 5 / 2, 'optim.nesterov': True, 'optim.weight_decay': 2e-4,
                 'optim.lr_boundaries_epochs': (100,), 'num_epochs': 200},
    'iad': {'method': 'iad', 'attack.bn_mode': 'train', 'ard.temperature': 1.0,
            'ard.reduction': 'batchmean', 'iad.beta': 0.1, 'iad.begin_epoch': 60,
            'optim.lr_boundaries_epochs': (100,)},
    'bat': {'method': 'bat', 'eps': 0.031, 'attack.alpha': 0.007, 'attack.steps': 10,
            'attack.init': 'normal_clipped', 'trades.beta': 6.0, 'bat.tau': 1, 'num_epochs': 200,
            'optim.lr_boundaries_epochs': (74, 89, 99), 'optim.weight_decay': 2e-4},
    'cfa': {'method': 'cfa', 'eps': 8 / 255, 'attack.alpha': 2 / 255, 'trades.beta': 6.0,
            'cfa.lambda_1': 0.5, 'cfa.lambda_2': 0.5, 'cfa.begin_epoch': 10,
            'cfa.fawa_decay': 0.88, 'cfa.fawa_threshold': 0.24, 'cfa.fawa_pgd_steps': 10,
            'data.val_size': 1000, 'num_epochs': 200, 'optim.weight_decay': 5e-4,
            'optim.lr_boundaries_epochs': (100, 150)},
    'frl': {'method': 'frl', 'num_epochs': 40, 'optim.lr': 1e-3, 'optim.weight_decay': 5e-4,
            'optim.lr_boundaries_epochs': (), 'frl.beta': 1.5, 'frl.tau_nat': 0.05,
            'frl.rate1': 0.05, 'frl.rate2': 0.2, 'frl.limit': 0.5, 'frl.step_size': 'max_eps_quarter',
            'frl.validation_pgd_steps': 20, 'data.val_size': 3000, 'init.source': 'train'},
    'absld_manual': {'method': 'absld_manual', 'absld.manual_hard_classes': (2, 3, 4, 5),
                     'absld.manual_hard_temperature': 0.5, 'absld.manual_easy_temperature': 5.0},
}


@pytest.mark.parametrize('row', sorted(_TABLE_ROWS) + ['natural', 'trades', 'rslad', 'absld'])
def test_absld_table_rows_follow_their_released_code(row):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'absld_table_cifar10.py') + f':{row}')
  for key, want in _TABLE_ROWS.get(row, {}).items():
    node = config
    for part in key.split('.'):
      node = node[part]
    assert node == pytest.approx(want) if isinstance(want, float) else node == want, (row, key)
  # Every row: a ResNet-18 on CIFAR-10, evaluated at 8/255, selected by avg + worst PGD-20.
  assert (config.model.name, config.data.name, config.eval.eps, config.eval.selection,
          config.eval.subset_size) == ('resnet18', 'cifar10', 8 / 255, 'fair', 0)


def test_every_table_row_and_its_subset_variant_validates():
  from ltd_jax.configs import absld_table_cifar10, absld_table_digits  # pylint: disable=g-import-not-at-top
  for row in absld_table_cifar10.ROWS + absld_table_cifar10.EXTRA:
    for variant in (row, f'{row}_subset'):
      config_lib.validate(absld_table_cifar10.get_config(variant))
  for row in absld_table_digits.ROWS:
    config = absld_table_digits.get_config(row)
    config_lib.validate(config)
    assert config.method == row and config.eval.selection == 'fair'
