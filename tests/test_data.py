"""Loaders on real data (digits, the CIFAR subsets, tfds mock data), errors, batching, augmentation."""

import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ltd_jax import data
from ltd_jax import datasets
from ltd_jax.errors import DatasetError
from tests.conftest import shared_path


def data_config(**kw):
  c = {'name': 'digits', 'source': 'auto', 'dir': '', 'val_size': 0, 'split_seed': 0}
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_digits_is_the_real_dataset_with_a_stratified_split():
  ds = datasets.load(data_config())
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
  counts = np.bincount(ds.test_labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  again = data.load_digits()
  np.testing.assert_array_equal(again.test_labels, ds.test_labels)  # fixed split


def test_digits_split_is_cached_and_later_runs_start_without_sklearn(tmp_path):
  """The first load writes the split to HOME/.cache/ltd_jax; a later process reads the same
  arrays without importing scikit-learn; a damaged cache is made again."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  code = ('import sys, numpy as np\n'
          'from ltd_jax import data\n'
          'ds = data.load_digits()\n'
          'np.savez(sys.argv[1], *(getattr(ds, k) for k in ("train_images", "train_labels", '
          '"test_images", "test_labels")))\n'
          'print("sklearn" in sys.modules)\n')
  env = dict(os.environ, HOME=str(tmp_path))

  def load(name):
    out = tmp_path / f'{name}.npz'
    proc = subprocess.run([sys.executable, '-c', code, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as f:
      return proc.stdout.strip(), [f[f'arr_{i}'] for i in range(4)]

  want = data.split_digits()
  assert not (tmp_path / '.cache').exists()
  for name, imported in (('first', 'True'), ('second', 'False')):
    said, got = load(name)
    assert said == imported, name  # the second run never imports scikit-learn
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype
  cache, = (tmp_path / '.cache' / 'ltd_jax').iterdir()
  assert cache.name.startswith('digits-sklearn-') and cache.suffix == '.npz'
  cache.write_bytes(cache.read_bytes()[:100])  # damaged: made again, and the split unchanged
  said, got = load('third')
  assert said == 'True'
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert load('fourth')[0] == 'False'


def test_validation_hold_out_is_stratified_and_disjoint():
  ds = datasets.load(data_config(val_size=200))
  assert len(ds.val_labels) == 200 and len(ds.train_labels) == 1237
  assert np.bincount(ds.val_labels).min() >= 19
  both = np.concatenate([ds.train_images, ds.val_images]).reshape(1437, -1)
  assert len(np.unique(both, axis=0)) == len(np.unique(data.load_digits().train_images.reshape(1437, -1), axis=0))


def test_cifar10_pickle_subset():
  root = os.path.dirname(shared_path('data', 'cifar-10-subset', 'cifar-10-batches-py'))
  ds = datasets.load(data_config(name='cifar10', dir=root))
  assert ds.train_images.shape == (5085, 32, 32, 3) and ds.test_images.shape == (1017, 32, 32, 3)
  assert ds.num_classes == 10 and set(np.unique(ds.test_labels)) == set(range(10))
  assert ds.class_names[0] == 'airplane'
  # The official layout, read independently: row r of data_batch_1 holds 1024 red values (32
  # rows of 32), then 1024 green, then 1024 blue; pixel (h, w, c) is row[c * 1024 + h * 32 + w].
  import pickle  # pylint: disable=g-import-not-at-top
  with open(os.path.join(root, 'cifar-10-batches-py', 'data_batch_1'), 'rb') as f:
    raw = pickle.load(f, encoding='bytes')
  rows, labels = np.asarray(raw[b'data']), np.asarray(raw[b'labels'])
  for r in (0, 1, 4321):
    for h, w, c in ((0, 0, 0), (0, 31, 1), (31, 0, 2), (5, 17, 0), (20, 3, 2)):
      assert ds.train_images[r, h, w, c] == rows[r, c * 1024 + h * 32 + w], (r, h, w, c)
  np.testing.assert_array_equal(ds.train_images.reshape(len(rows), -1),
                                rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(len(rows), -1))
  np.testing.assert_array_equal(ds.train_labels, labels)


def test_cifar100_pickle_subset_uses_fine_labels():
  root = os.path.dirname(shared_path('data', 'cifar-100-subset', 'cifar-100-python'))
  ds = datasets.load(data_config(name='cifar100', dir=root, source='pickle'))
  assert ds.train_images.shape == (281, 32, 32, 3) and ds.test_images.shape == (148, 32, 32, 3)
  assert ds.num_classes == 100 and ds.train_labels.max() > 19
  assert len(ds.class_names) == 100


def test_missing_dataset_names_paths_and_both_fixes(tmp_path):
  with pytest.raises(DatasetError) as e:
    datasets.load(data_config(name='cifar10', dir=str(tmp_path)))
  msg = str(e.value)
  assert str(tmp_path / 'cifar-10-batches-py') in msg
  assert '--config.data.dir' in msg and 'source=tfds' in msg and '\n' not in msg


def test_labels_out_of_range_are_rejected(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  rows = np.zeros((4, 3072), np.uint8)
  for name, labels in (('data_batch_1', [0, 1, 2, 3]), ('test_batch', [0, 1, 2, 10])):
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': rows, b'labels': labels}, f)
  with pytest.raises(DatasetError, match=r'labels must lie in \[0, 10\)'):
    datasets.load(data_config(name='cifar10', dir=str(tmp_path)))


def test_pickle_carrying_code_is_refused(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()

  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))

  with open(folder / 'data_batch_1', 'wb') as f:
    pickle.dump({b'data': Evil(), b'labels': [0]}, f)
  with pytest.raises(DatasetError, match='refusing to load'):
    datasets.load(data_config(name='cifar10', dir=str(tmp_path)))


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = datasets.load(data_config(name='cifar10', source='tfds'))
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.shape == (12,)


def test_unknown_dataset_and_source():
  with pytest.raises(DatasetError, match='unknown dataset'):
    datasets.load(data_config(name='mnist'))
  with pytest.raises(DatasetError, match='unknown data.source'):
    datasets.load(data_config(name='cifar10', source='http'))


def test_batches_are_a_pure_function_of_seed_and_step():
  n, b = 103, 10
  epoch0 = np.concatenate([data.train_batch_indices(n, b, 7, s) for s in range(10)])
  assert len(np.unique(epoch0)) == 100  # no repeats within an epoch, last partial batch dropped
  np.testing.assert_array_equal(data.train_batch_indices(n, b, 7, 3), epoch0[30:40])
  assert not np.array_equal(data.train_batch_indices(n, b, 7, 10), epoch0[:10])  # new epoch order
  assert not np.array_equal(data.train_batch_indices(n, b, 8, 0), epoch0[:10])  # other seed


def test_crop_flip_gives_shifted_or_flipped_crops_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(1, 256, size=(16, 8, 8, 3)), jnp.uint8)
  out = np.asarray(data.augment(jax.random.PRNGKey(0), images, 'crop_flip'))
  assert out.shape == (16, 8, 8, 3) and out.dtype == np.float32
  src = np.asarray(images, np.float32) / 255
  padded = np.pad(src, ((0, 0), (4, 4), (4, 4), (0, 0)))
  kinds = set()
  for i in range(16):
    found = None
    for dy in range(9):
      for dx in range(9):
        crop = padded[i, dy:dy + 8, dx:dx + 8]
        if np.allclose(out[i], crop, atol=1e-6):
          found = 'crop'
        elif np.allclose(out[i], crop[:, ::-1], atol=1e-6):
          found = 'flip'
    assert found is not None, f'image {i} is not a crop of its padded source'
    kinds.add(found)
  assert kinds == {'crop', 'flip'}
  again = np.asarray(data.augment(jax.random.PRNGKey(0), images, 'crop_flip'))
  np.testing.assert_array_equal(out, again)
  np.testing.assert_allclose(data.augment(None, images, "none"), src, atol=1e-6)
