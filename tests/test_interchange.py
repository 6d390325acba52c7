"""PyTorch interchange: exported weights load strictly into the PyTorch twins and give the same
logits; import gives back identical arrays; files, wrappers and bad checkpoints."""

import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import interchange
from ltd_jax import models
from ltd_jax.errors import CheckpointError
from tests.conftest import shared_path

torch = pytest.importorskip('torch')
torch_models = pytest.importorskip('ltd_jax.torch_models')


def random_variables(name, shape, seed=0, num_classes=10, **kw):
  """He-scaled random weights and non-trivial BN statistics: each layer's statistics of a
  calibration batch, then shifted and rescaled, so that eval mode differs from train mode while
  the logits still depend on the input. (numpy draws: Flax's jitted init is slow to compile.)"""
  model = models.create_model(name, num_classes, **kw)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             np.zeros((1, *shape), np.float32), train=False))
  rng = np.random.default_rng(seed)

  def param(path, s):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return ((path[-1].key == 'scale') + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(param, shapes['params'])
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda p, s: np.full(s.shape, float(p[-1].key == 'var'), np.float32), shapes['batch_stats'])
  x = rng.uniform(size=(8, *shape)).astype(np.float32)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      {'params': params, 'batch_stats': batch_stats}, x)

  def stat(path, old, new):  # Flax: new = 0.9 old + 0.1 batch
    batch = (np.asarray(new) - 0.9 * np.asarray(old)) / 0.1
    if path[-1].key == 'mean':
      return (batch + 0.1 * rng.standard_normal(batch.shape)).astype(np.float32)
    return (np.maximum(batch, 1e-3) * rng.uniform(0.7, 1.4, batch.shape)).astype(np.float32)
  return model, params, jax.tree_util.tree_map_with_path(stat, batch_stats,
                                                         updates['batch_stats'])


def torch_logits(torch_model, x_nhwc):
  with torch.no_grad():
    return torch_model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def load_strict(torch_model, state_dict):
  torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                              strict=True)
  return torch_model


ARCHS = [
    ('small_cnn', dict(width=8), (8, 8, 1)),
    ('resnet18', dict(base_width=8), (32, 32, 3)),
    ('preactresnet18', dict(base_width=8), (32, 32, 3)),
    ('preactresnet18-bn', dict(base_width=8), (32, 32, 3)),
    ('mobilenetv2', {}, (32, 32, 3)),
    ('wrn-10-2', {}, (32, 32, 3)),
    ('dm-wrn-16-2', {}, (32, 32, 3)),
    ('preactresnet34', dict(base_width=8), (32, 32, 3)),
    ('resnet50', {}, (64, 64, 3)),
    ('wrn-50-2', {}, (32, 32, 3)),
]


@pytest.mark.parametrize('name,kw,shape', ARCHS)
def test_pytorch_logits_equal_jax_logits(name, kw, shape):
  model, params, batch_stats = random_variables(name, shape, **kw)
  x = np.random.default_rng(1).uniform(size=(4, *shape)).astype(np.float32)
  jax_out = np.asarray(jax.jit(model.apply)({'params': params, 'batch_stats': batch_stats}, x))
  state_dict = interchange.to_torch_state_dict(params, batch_stats, num_batches_tracked=7)
  assert {k: v.shape for k, v in state_dict.items()} == \
      interchange.torch_state_dict_shapes(params, batch_stats)
  head = next(k for k in ('fc.bias', 'linear.bias', 'logits.bias') if k in state_dict)
  assert state_dict[head].dtype == np.float32
  tm = load_strict(torch_models.build_torch_model(name, 10, shape[-1], **kw), state_dict)
  assert not tm.training
  out = torch_logits(tm, x)
  # The logits vary with the input by much more than the tolerance: a real comparison.
  assert np.std(jax_out, axis=0).mean() > 1e-2 * np.abs(jax_out).max()
  assert np.abs(out - jax_out).max() / np.abs(jax_out).max() < 1e-4
  # Export then import gives back the identical arrays.
  p2, b2 = interchange.from_torch_state_dict(state_dict, params, batch_stats)
  for a, b in zip(jax.tree_util.tree_leaves((params, batch_stats)),
                  jax.tree_util.tree_leaves((p2, b2))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree_util.tree_structure((params, batch_stats)) == \
      jax.tree_util.tree_structure((p2, b2))


def test_dm_wrn_70_16_imports_a_robustbench_layout_checkpoint():
  """Gowal et al.'s WRN-70-16 (RobustBench ``Gowal2020Uncovering_70_16_extra``, the ABSLD
  CIFAR-100 teacher): the keys RobustBench's DMWideResNet writes, the full model's layout built
  without memory (meta device), and a randomly initialised twin of it imported into JAX, with
  its CIFAR-100 input normalisation, giving the same logits."""
  with torch.device('meta'):
    full = torch_models.build_torch_model('dm-wrn-70-16', 100).state_dict()
  want = {k: tuple(v.shape) for k, v in full.items()}
  # RobustBench's names: 11 blocks per group, the shortcut in each group's first block only.
  for key, shape in (('init_conv.weight', (16, 3, 3, 3)),
                     ('layer.0.block.0.shortcut.weight', (256, 16, 1, 1)),
                     ('layer.2.block.10.batchnorm_1.running_var', (1024,)),
                     ('layer.1.block.0.conv_0.weight', (512, 256, 3, 3)),
                     ('batchnorm.num_batches_tracked', ()), ('logits.weight', (100, 1024))):
    assert want[key] == shape, key
  assert 'layer.0.block.1.shortcut.weight' not in want and 'mean' not in want
  shapes = jax.eval_shape(lambda r: models.init_variables(models.create_model('dm-wrn-70-16', 100),
                                                          r, (32, 32, 3)), jax.random.PRNGKey(0))
  assert interchange.torch_state_dict_shapes(*shapes) == want
  # A small twin, randomly initialised in PyTorch (BN statistics moved off their defaults), read
  # the other way: the JAX model of the imported weights computes the PyTorch logits.
  torch.manual_seed(0)
  twin = torch_models.build_torch_model('dm-wrn-16-2', 100)
  with torch.no_grad():
    for m in twin.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
  model = models.create_model('dm-wrn-16-2', 100)
  params, stats = models.init_variables(model, jax.random.PRNGKey(1), (32, 32, 3))
  sd = {k: v.numpy() for k, v in twin.state_dict().items()}
  params, stats = interchange.from_torch_state_dict(sd, params, stats, model_name='dm-wrn-16-2')
  x = np.random.default_rng(2).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  jax_out = np.asarray(model.apply({'params': params, 'batch_stats': stats}, x))
  out = torch_logits(twin, x)
  assert np.abs(out - jax_out).max() / np.abs(jax_out).max() < 1e-4
  # The normalisation is CIFAR-100's: CIFAR-10's statistics give other logits.
  assert np.abs(np.asarray(models.DMWideResNet(16, 2, 10).apply(
      {'params': {**params, 'logits': {'kernel': params['logits']['kernel'][:, :10],
                                       'bias': params['logits']['bias'][:10]}},
       'batch_stats': stats}, x)) - jax_out[:, :10]).max() > 1e-3


def test_full_size_wrn_34_10_parity_and_spec_layout():
  shape = (32, 32, 3)
  model, params, batch_stats = random_variables('wrn-34-10', shape)
  state_dict = interchange.to_torch_state_dict(params, batch_stats)
  spec = interchange.read_torch_keys(shared_path('spec', 'torch_keys', 'wrn-34-10.txt'))
  assert {k: v.shape for k, v in state_dict.items()} == spec
  x = np.random.default_rng(2).uniform(size=(2, *shape)).astype(np.float32)
  jax_out = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(
      {'params': params, 'batch_stats': batch_stats}, x))
  out = torch_logits(load_strict(torch_models.WideResNet(34, 10, 10).eval(), state_dict), x)
  assert np.abs(out - jax_out).max() / np.abs(jax_out).max() < 1e-4


def test_torch_model_in_train_mode_updates_running_stats_like_flax():
  """BN momentum agrees: one train-mode step moves the statistics alike (up to the variance's
  Bessel correction, which PyTorch applies to running_var and Flax does not)."""
  model, params, batch_stats = random_variables('small_cnn', (8, 8, 1), width=4)
  x = np.random.default_rng(3).uniform(size=(16, 8, 8, 1)).astype(np.float32)
  _, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                           mutable=['batch_stats'])
  tm = load_strict(torch_models.build_torch_model('small_cnn', 10, 1, width=4),
                   interchange.to_torch_state_dict(params, batch_stats))
  tm.train()
  with torch.no_grad():
    tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  got = {k: v.numpy() for k, v in tm.state_dict().items()}
  before = interchange.to_torch_state_dict(params, batch_stats)
  flax_after = interchange.to_torch_state_dict(params, updates['batch_stats'])
  for bn, n in (('bn1', 16 * 8 * 8), ('bn3', 16 * 2 * 2)):  # values per channel: batch x H x W
    np.testing.assert_allclose(got[f'{bn}.running_mean'], flax_after[f'{bn}.running_mean'],
                               rtol=1e-5, atol=1e-6)
    # Flax keeps the biased batch variance, PyTorch the unbiased one (factor n / (n - 1)).
    old = before[f'{bn}.running_var']
    batch_var = (flax_after[f'{bn}.running_var'] - 0.9 * old) / 0.1
    np.testing.assert_allclose(got[f'{bn}.running_var'], 0.9 * old + 0.1 * batch_var * n / (n - 1),
                               rtol=1e-4)
  assert int(got['bn1.num_batches_tracked']) == 1


@pytest.fixture
def tiny_state_dict():
  _, params, batch_stats = random_variables('small_cnn', (8, 8, 1), width=4)
  return params, batch_stats, interchange.to_torch_state_dict(params, batch_stats)


def _same(tree_a, tree_b):
  return all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree_a),
                                                  jax.tree_util.tree_leaves(tree_b)))


def test_files_wrappers_prefixes_and_trades_sub_block1(tiny_state_dict, tmp_path):
  params, batch_stats, sd = tiny_state_dict
  interchange.save_safetensors(str(tmp_path / 'm.safetensors'), sd)
  interchange.save_torch(str(tmp_path / 'm.pt'), sd)
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  wrapped = {
      'state_dict.pth': {'state_dict': {f'module.{k}': v for k, v in tensors.items()},
                         'epoch': 76},
      'model.pth': {'model': tensors, 'optimizer': {'lr': torch.tensor(0.1)}},
      'trades_release.pt': {**tensors, 'sub_block1.layer.0.bn1.weight': torch.ones(3)},
  }
  for name, obj in wrapped.items():
    torch.save(obj, tmp_path / name)
  for name in ('m.safetensors', 'm.pt', *wrapped):
    loaded = interchange.load_torch_file(str(tmp_path / name))
    assert sorted(loaded) == sorted(sd), name
    p, b = interchange.from_torch_state_dict(loaded, params, batch_stats, source=name)
    assert _same((p, b), (params, batch_stats)), name
  # The raw .pt is a plain state_dict of tensors: it loads with weights_only=True as is.
  raw = torch.load(tmp_path / 'm.pt', weights_only=True)
  assert isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values())
  assert raw['bn1.num_batches_tracked'].dtype == torch.int64


def test_each_kind_of_key_mismatch_alone_is_one_exact_line(tiny_state_dict):
  params, batch_stats, sd = tiny_state_dict
  tail = ('): pick the architecture it was saved from (--config.model.name, teacher.model.name) '
          'or another checkpoint')
  only_missing = {k: v for k, v in sd.items() if k != 'conv2.weight'}
  only_unexpected = {**sd, 'head.weight': np.zeros((3, 3), np.float32)}
  shapes = [k for k, v in sd.items() if np.ndim(v) >= 1]
  only_misshaped = {k: (np.zeros((1,) * 5, np.float32) if k in shapes else v) for k, v in sd.items()}
  for bad, middle in ((only_missing, '1 missing: conv2.weight'),
                      (only_unexpected, '1 unexpected: head.weight')):
    with pytest.raises(CheckpointError) as e:
      interchange.from_torch_state_dict(bad, params, batch_stats)
    assert str(e.value) == f'state_dict does not fit the model ({middle}' + tail
  with pytest.raises(CheckpointError) as e:
    interchange.from_torch_state_dict(only_misshaped, params, batch_stats, 'm.pt', 'small_cnn')
  listed = str(e.value).split('of another shape: ')[1].split('): pick')[0]
  assert str(e.value).startswith(f'm.pt does not fit small_cnn ({len(shapes)} of another shape: ')
  assert listed.count(' != ') == 4 and listed.endswith(f'... ({len(shapes) - 4} more)')  # four listed


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_state_dict):
  params, batch_stats, sd = tiny_state_dict
  bad = dict(sd)
  del bad['conv2.weight']
  bad['head.weight'] = np.zeros((3, 3), np.float32)
  bad['fc.weight'] = np.zeros((7, 16), np.float32)
  del bad['bn1.num_batches_tracked']  # optional: an eval-mode forward does not read it
  with pytest.raises(CheckpointError) as e:
    interchange.from_torch_state_dict(bad, params, batch_stats, source='x.pt',
                                      model_name='small_cnn')
  msg = str(e.value)
  assert '\n' not in msg
  assert '1 missing: conv2.weight' in msg and '1 unexpected: head.weight' in msg
  assert '(1 missing: conv2.weight; 1 unexpected: head.weight; 1 of another shape: ' in msg
  assert 'fc.weight (7, 16) != (10, 16)' in msg and 'x.pt does not fit small_cnn' in msg


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
  _, p_resnet, b_resnet = random_variables('resnet18', (32, 32, 3), base_width=4)
  path = str(tmp_path / 'resnet.pt')
  interchange.save_torch(path, interchange.to_torch_state_dict(p_resnet, b_resnet))
  _, p_wrn, b_wrn = random_variables('wrn-10-1', (32, 32, 3))
  with pytest.raises(CheckpointError, match='missing: block1.layer.0.bn1.bias.*unexpected: '):
    interchange.from_torch_state_dict(interchange.load_torch_file(path), p_wrn, b_wrn,
                                      source=path, model_name='wrn-10-2')


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch PWNED',))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_that_carry_code_are_refused_without_running_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / 'evil.pt'
  torch.save({'conv1.weight': torch.zeros(1), 'payload': _RunsCode()}, path)
  with open(tmp_path / 'evil_plain.pth', 'wb') as f:
    pickle.dump({'x': _RunsCode()}, f)
  for name in ('evil.pt', 'evil_plain.pth'):
    with pytest.raises(CheckpointError, match=r'weights_only=True\) refused it \(Weights only load'):
      interchange.load_torch_file(str(tmp_path / name))
  assert not (tmp_path / 'PWNED').exists()


def test_truncated_missing_and_non_dict_files(tiny_state_dict, tmp_path):
  _, _, sd = tiny_state_dict
  interchange.save_torch(str(tmp_path / 'm.pt'), sd)
  interchange.save_safetensors(str(tmp_path / 'm.safetensors'), sd)
  # The reader's own reason (its wording depends on where the file ends) is quoted in the line.
  for name in ('m.pt', 'm.safetensors'):
    data = (tmp_path / name).read_bytes()
    (tmp_path / f'cut_{name}').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated') as e:
      interchange.load_torch_file(str(tmp_path / f'cut_{name}'))
    reason = str(e.value).split(f'cut_{name}', 1)[1]
    assert re.match(r' (as safetensors )?\((?!None\))[^)]{5,}\)', reason), reason
    assert '\n' not in str(e.value)
  with pytest.raises(CheckpointError, match='not found'):
    interchange.load_torch_file(str(tmp_path / 'nope.pt'))
  torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
  with pytest.raises(CheckpointError, match='expected a state_dict'):
    interchange.load_torch_file(str(tmp_path / 'tensor.pt'))


def test_only_kernels_change_layout_between_flax_and_torch():
  """HWIO conv kernels -> OIHW, dense (in, out) -> (out, in); every other leaf keeps its shape,
  two-dimensional ones included."""
  assert interchange.torch_shape('kernel', (3, 5, 2, 7)) == (7, 2, 3, 5)
  assert interchange.torch_shape('kernel', (64, 10)) == (10, 64)
  assert interchange.torch_shape('kernel', (10,)) == (10,)
  for name in ('scale', 'bias', 'mean', 'var', 'embedding'):
    assert interchange.torch_shape(name, (4, 6)) == (4, 6), name
    assert interchange.torch_shape(name, (6,)) == (6,), name


def test_torch_module_names_by_hand():
  """A trailing _N is an index (layer_0 -> layer.0), a double underscore one underscore, and a
  name that is only an index (_3: nothing to index) is kept whole."""
  assert interchange.torch_module_name(('block1', 'layer_0', 'bn1')) == 'block1.layer.0.bn1'
  assert interchange.torch_module_name(('features_12', 'batchnorm__0')) == 'features.12.batchnorm_0'
  assert interchange.torch_module_name(('_3', 'conv')) == '_3.conv'
  assert interchange.torch_module_name(('logits',)) == 'logits'


def test_an_export_is_float32_whatever_the_dtype_the_variables_are_kept_in():
  """A PyTorch model holds float32 tensors: bfloat16 (mixed-precision) or float64 variables
  are written as their float32 values, in torch's layout; num_batches_tracked stays int64."""
  _, params, batch_stats = random_variables('small_cnn', (8, 8, 1), width=4)
  want = interchange.to_torch_state_dict(params, batch_stats)
  for dtype in (jnp.bfloat16, np.float64):
    cast = lambda tree: jax.tree_util.tree_map(lambda v: np.asarray(v).astype(dtype), tree)
    got = interchange.to_torch_state_dict(cast(params), cast(batch_stats))
    assert set(got) == set(want)
    for key, value in got.items():
      if key.endswith('num_batches_tracked'):
        assert value.dtype == np.int64, key
        continue
      assert value.dtype == np.float32 and value.shape == want[key].shape, (dtype, key)
      np.testing.assert_allclose(value, want[key], rtol=1e-2 if dtype == jnp.bfloat16 else 1e-7)


def test_a_checkpoint_saved_from_cuda_tensors_loads_on_a_machine_without_a_gpu(tmp_path,
                                                                               monkeypatch):
  """Released teachers are saved from CUDA tensors; torch.load restores each storage to the
  device it names unless told otherwise, which fails where there is no GPU. The file is made
  here as a GPU machine writes it: the storages' location tag reads 'cuda:0'."""
  if torch.cuda.is_available():
    pytest.skip('with a GPU, a cuda:0 tag loads without map_location')
  sd = {'conv1.weight': torch.arange(6.0).reshape(1, 1, 2, 3), 'bn1.running_var': torch.ones(2)}
  with monkeypatch.context() as m:
    m.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
    torch.save(sd, tmp_path / 'gpu_saved.pt')
  with pytest.raises(RuntimeError, match='CUDA'):  # the file really names a CUDA device
    torch.load(tmp_path / 'gpu_saved.pt', weights_only=True)
  loaded = interchange.load_torch_file(str(tmp_path / 'gpu_saved.pt'))
  assert sorted(loaded) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(loaded[k], v.numpy())


def test_pt_files_are_unpickled_with_weights_only_whatever_torchs_default(tmp_path, monkeypatch):
  """torch.load's weights_only default was False before torch 2.6 (a GPU box may carry an older
  CUDA build): the library asks for True itself, so code-carrying pickles are refused on any
  torch; and it maps storages to the CPU."""
  torch.save({'conv1.weight': torch.ones(2)}, tmp_path / 'm.pt')
  seen, load = [], torch.load
  monkeypatch.setattr(torch, 'load', lambda *a, **kw: seen.append(kw) or load(*a, **kw))
  interchange.load_torch_file(str(tmp_path / 'm.pt'))
  assert seen == [{'map_location': 'cpu', 'weights_only': True}]


def _torchvision_resnet_module():
  """torchvision's own ``models/resnet.py`` (torchvision comes with robustbench in
  requirements-dev.txt), imported without running the package's ``__init__``, whose compiled
  operators need the exact torch build they were made for (not the CPU wheel here)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.skip('torchvision is not installed (pip install -r requirements-dev.txt)')
  root = os.path.dirname(spec.origin)
  saved = {k: v for k, v in sys.modules.items() if k == 'torchvision' or k.startswith('torchvision.')}
  try:
    for name, path in (('torchvision', root), ('torchvision.models', os.path.join(root, 'models'))):
      package = types.ModuleType(name)
      package.__path__ = [path]
      sys.modules[name] = package
    return importlib.import_module('torchvision.models.resnet')
  finally:
    for k in [k for k in sys.modules if k == 'torchvision' or k.startswith('torchvision.')]:
      del sys.modules[k]
    sys.modules.update(saved)


@pytest.mark.parametrize('name,builder', [('resnet50', 'resnet50'), ('wrn-50-2', 'wide_resnet50_2')])
def test_imagenet_models_have_torchvisions_keys_and_load_into_it(name, builder):
  """README: ``resnet50`` / ``wrn-50-2`` use torchvision's layout and keys, and export names
  ``torchvision.models.NAME``: every key and shape equal to torchvision's own model, which loads
  the export strictly and computes the JAX logits."""
  resnet = _torchvision_resnet_module()
  with torch.device('meta'):
    want = {k: tuple(v.shape) for k, v in
            getattr(resnet, builder)(num_classes=10).state_dict().items()}
  # The image size and batch of test_pytorch_logits_equal_jax_logits: the same programs, which
  # the compilation cache then holds.
  shape = next(s for n, _, s in ARCHS if n == name)
  model, params, batch_stats = random_variables(name, shape)
  assert interchange.torch_state_dict_shapes(params, batch_stats) == want
  tm = load_strict(getattr(resnet, builder)(num_classes=10).eval(),
                   interchange.to_torch_state_dict(params, batch_stats))
  x = np.random.default_rng(5).uniform(size=(4, *shape)).astype(np.float32)
  jax_out = np.asarray(jax.jit(model.apply)({'params': params, 'batch_stats': batch_stats}, x))
  assert np.abs(torch_logits(tm, x) - jax_out).max() / np.abs(jax_out).max() < 1e-4


def _robustbench_module(name):
  """RobustBench's own architecture file (robustbench is in requirements-dev.txt, so these run
  in CI), loaded on its own rather than through the package's model zoo."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    dist = importlib.metadata.distribution('robustbench')
  except importlib.metadata.PackageNotFoundError:
    pytest.skip('robustbench is not installed (pip install -r requirements-dev.txt)')
  path = dist.locate_file(f'robustbench/model_zoo/architectures/{name}.py')
  spec = importlib.util.spec_from_file_location(f'robustbench_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('name,build', [
    ('wrn-16-2', lambda rb: rb['wide_resnet'].WideResNet(depth=16, widen_factor=2, num_classes=10)),
    ('resnet18', lambda rb: rb['resnet'].ResNet(rb['resnet'].BasicBlock, [2, 2, 2, 2], 10)),
    ('preactresnet18', lambda rb: rb['resnet'].PreActResNet(rb['resnet'].PreActBlockV2,
                                                            [2, 2, 2, 2], 10)),
    ('preactresnet18-bn', lambda rb: rb['resnet'].PreActResNet(
        rb['resnet'].PreActBlockV2, [2, 2, 2, 2], 10, bn_before_fc=True)),
    # Gowal2020Uncovering_70_16_extra's class and arguments (ABSLD's CIFAR-100 teacher), at 16-2.
    ('dm-wrn-16-2', lambda rb: rb['dm_wide_resnet'].DMWideResNet(
        num_classes=100, depth=16, width=2, activation_fn=rb['dm_wide_resnet'].Swish,
        mean=rb['dm_wide_resnet'].CIFAR100_MEAN, std=rb['dm_wide_resnet'].CIFAR100_STD)),
])
def test_export_loads_strictly_into_robustbench_classes(name, build):
  rb = {m: _robustbench_module(m) for m in ('wide_resnet', 'resnet', 'dm_wide_resnet')}
  classes = 100 if name.startswith('dm-wrn') else 10
  model, params, batch_stats = random_variables(name, (32, 32, 3), num_classes=classes)
  tm = load_strict(build(rb).eval(), interchange.to_torch_state_dict(params, batch_stats))
  x = np.random.default_rng(4).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  jax_out = np.asarray(jax.jit(model.apply)({'params': params, 'batch_stats': batch_stats}, x))
  assert np.abs(torch_logits(tm, x) - jax_out).max() / np.abs(jax_out).max() < 1e-4


def test_state_dict_helpers_by_hand(tmp_path):
  """The small pieces of the PyTorch side, each against values written out by hand."""
  # num_batches_tracked: the largest count (0-d or [1]); None without BatchNorm.
  assert interchange.batches_tracked({'a.num_batches_tracked': np.array(3),
                                      'b.num_batches_tracked': np.array([9]),
                                      'b.running_mean': np.array([100.0])}) == 9
  assert interchange.batches_tracked({'fc.weight': np.zeros((2, 2))}) is None
  assert interchange.batches_tracked({'bn.num_batches_tracked': np.zeros((0,))}) is None
  # Wrappers, DataParallel prefixes (nested too) and TRADES' unused sub_block1 copy.
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    sd = interchange.canonical_state_dict({wrapper: {'module.module.conv.weight': 1,
                                                     'sub_block1.x': 2, 'fc.bias': 3}, 'epoch': 7})
    assert sd == {'conv.weight': 1, 'fc.bias': 3}, wrapper
  assert interchange.canonical_state_dict({'module.fc.w': 1}) == {'fc.w': 1}
  with pytest.raises(CheckpointError, match='expected a state_dict .* found list'):
    interchange.canonical_state_dict([1])
  # Error text: the first line of a message, at most 200 characters, or the exception's type.
  assert interchange._first_line(ValueError('  bad header\nsecond line')) == 'bad header'
  assert interchange._first_line(ValueError('x' * 300)) == 'x' * 200
  assert interchange._first_line(EOFError()) == 'EOFError'
  assert interchange._listing(['c', 'a', 'b']) == 'a, b, c'
  assert interchange._listing([f'k{i}' for i in range(6)], limit=6) == 'k0, k1, k2, k3, k4, k5'
  assert interchange._listing([f'k{i}' for i in range(7)]).endswith('k5, ... (1 more)')  # 6 shown
  assert interchange._listing([f'k{i}' for i in range(8)], limit=6) == \
      'k0, k1, k2, k3, k4, k5, ... (2 more)'
  # A spec file line: key<TAB>[d0, d1]; 0-d keys have [].
  spec = tmp_path / 'keys.txt'
  spec.write_text('conv.weight\t[16, 3, 3, 3]\n\nbn.num_batches_tracked\t[]\nfc.bias\t[10]\n')
  assert interchange.read_torch_keys(str(spec)) == {
      'conv.weight': (16, 3, 3, 3), 'bn.num_batches_tracked': (), 'fc.bias': (10,)}
  # safetensors keeps 0-d counts 0-d and non-contiguous arrays' values, tagged for PyTorch.
  import safetensors  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'm.safetensors')
  kernel = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
  interchange.save_safetensors(path, {'bn.num_batches_tracked': np.array(5, np.int64), 'k': kernel})
  with safetensors.safe_open(path, 'np') as f:
    assert f.metadata() == {'format': 'pt'}
    assert f.get_tensor('bn.num_batches_tracked').shape == ()
    np.testing.assert_array_equal(f.get_tensor('k'), kernel)
  # torch tensors to numpy: bfloat16 widened to float32, integers kept, other values as they are.
  got = interchange._tensor_to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
  assert got.dtype == np.float32 and got.tolist() == [1.5, -2.0]
  assert interchange._tensor_to_numpy(torch.tensor([3])).dtype == np.int64
  assert interchange._tensor_to_numpy('x') == 'x'


def test_reading_a_pt_file_without_torch_is_one_line(tmp_path, monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'm.pt'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(CheckpointError, match=r'm.pt needs PyTorch: pip install -r '
                     r'requirements-torch.txt, or use the .safetensors export'):
    interchange.load_torch_file(str(path))
