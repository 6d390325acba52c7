"""Architectures: PyTorch parameter counts and state_dict layouts, padding, BatchNorm behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import interchange
from ltd_jax import models
from tests.conftest import shared_path

PYTORCH_LAYOUTS = [
    ('wrn-34-10', 'wrn-34-10.txt', 46_160_474),
    ('wrn-34-20', 'wrn-34-20.txt', None),
    ('resnet18', 'resnet18-cifar.txt', 11_173_962),
    ('preactresnet18', 'preactresnet18-robustbench.txt', None),
    ('preactresnet18-bn', 'preactresnet18-awp-rice.txt', None),
    ('mobilenetv2', 'mobilenetv2-cifar-kuangliu.txt', 2_296_922),
]


def abstract_variables(name, num_classes=10, shape=(32, 32, 3)):
  model = models.create_model(name, num_classes)
  return jax.eval_shape(lambda r: models.init_variables(model, r, shape), jax.random.PRNGKey(0))


@pytest.mark.parametrize('name,keys_file,count', PYTORCH_LAYOUTS)
def test_state_dict_layout_equals_pytorch(name, keys_file, count):
  params, batch_stats = abstract_variables(name)
  want = interchange.read_torch_keys(shared_path('spec', 'torch_keys', keys_file))
  got = interchange.torch_state_dict_shapes(params, batch_stats)
  assert got == want
  torch_count = sum(int(np.prod(s)) for k, s in want.items()
                    if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
  assert models.count_params(params) == torch_count
  if count is not None:
    assert torch_count == count


def test_other_wrn_depths_and_class_counts():
  p, _ = abstract_variables('wrn-28-10', num_classes=100)
  assert p['fc']['kernel'].shape == (640, 100)
  assert len(p['block1']) == 4
  p, _ = abstract_variables('wrn-70-16')
  assert len(p['block3']) == 11 and p['fc']['kernel'].shape == (1024, 10)
  with pytest.raises(ValueError, match='6n\\+4'):
    models.create_model('wrn-33-10', 10)
  with pytest.raises(ValueError, match='unknown model'):
    models.create_model('vgg16', 10)


@pytest.mark.parametrize('name,kw,shape', [
    ('wrn-10-1', {}, (32, 32, 3)),
    ('resnet18', {'base_width': 4}, (32, 32, 3)),
    ('preactresnet18-bn', {'base_width': 4}, (32, 32, 3)),
    ('mobilenetv2', {}, (32, 32, 3)),
    ('small_cnn', {'width': 4}, (8, 8, 1)),
])
def test_forward_and_batchnorm_modes(name, kw, shape):
  model = models.create_model(name, 10, **kw)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), shape)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
  variables = {'params': params, 'batch_stats': batch_stats}
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)  # not op by op
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  logits_train, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert not np.allclose(logits, logits_train)  # batch statistics differ from running ones
  # PyTorch momentum 0.1: running_mean <- 0.9 * running_mean + 0.1 * batch_mean (init 0).
  first_bn = sorted(upd['batch_stats'])[0]
  bs = upd['batch_stats'][first_bn]
  while 'mean' not in bs:
    bs = bs[sorted(bs)[0]]
  assert float(jnp.max(jnp.abs(bs['mean']))) > 0
  assert float(jnp.min(bs['var'])) > 0.89  # 0.9 * 1 + 0.1 * var


def test_stride_two_convolution_pads_symmetrically_like_pytorch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
  conv = models.conv(3, 3, stride=2)
  params = conv.init(jax.random.PRNGKey(0), x)
  got = np.asarray(conv.apply(params, x))
  k = np.asarray(params['params']['kernel'])  # HWIO
  xp = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 3))
  for i in range(3):
    for j in range(3):
      patch = xp[2 * i:2 * i + 3, 2 * j:2 * j + 3]
      want[i, j] = np.einsum('hwi,hwio->o', patch, k)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.create_model('small_cnn', 10, dtype=jnp.bfloat16, width=4)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = model.apply({'params': params, 'batch_stats': batch_stats}, jnp.ones((2, 8, 8, 1)))
  assert out.dtype == jnp.float32


def test_batch_variance_is_two_pass_as_in_pytorch():
  """Features with |mean| >> std (300 +- 0.01): the one-pass E[x^2] - E[x]^2 of float32 loses
  every digit of the variance; the two-pass variance keeps it, as PyTorch's BatchNorm2d does."""
  x = (300.0 + 0.01 * np.random.default_rng(0).standard_normal((16, 4, 4, 3))).astype(np.float32)
  bn = models.batch_norm(True, 'bn')
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  var64 = x.astype(np.float64).reshape(-1, 3).var(axis=0)  # biased: Flax keeps it (see interchange)
  running = np.asarray(updates['batch_stats']['var'])
  # PyTorch's momentum 0.1 from var 1 and mean 0 (Flax's default 0.99 would fail both).
  np.testing.assert_allclose((running - 0.9) / 0.1, var64, rtol=2e-3)
  np.testing.assert_allclose(np.asarray(updates['batch_stats']['mean']),
                             0.1 * x.astype(np.float64).reshape(-1, 3).mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3).std(axis=0),
                             np.sqrt(var64 / (var64 + 1e-5)), rtol=2e-3)
