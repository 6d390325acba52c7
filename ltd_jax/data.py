"""Datasets held in host memory as uint8 NHWC, batched by epoch permutation, augmented on device.

Sources:
  * ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 images), fixed stratified split.
  * ``cifar10`` / ``cifar100`` from the official python-pickle layout
    (``cifar-10-batches-py`` / ``cifar-100-python``) in a local directory.
  * the same through ``tfds.data_source`` (array-record, random access; no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ltd_jax import download
from ltd_jax.errors import DatasetError

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

_PICKLE_DIRS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/test (and optional validation) split of one dataset, uint8 NHWC + int32 labels."""
  name: str
  num_classes: int
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  val_images: np.ndarray | None = None
  val_labels: np.ndarray | None = None
  class_names: tuple[str, ...] = ()
  # Generated images mixed into every training batch (``generated.GeneratedImages``,
  # ``data.generated_path``); None: the real images alone.
  generated: object = None

  streaming = False  # see input_pipeline.StreamingDataset

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == 'val':
      if self.val_images is None:
        raise DatasetError('no validation split: set --config.data.val_size=N (>0) to hold one out')
      return self.val_images, self.val_labels
    if name not in ('train', 'test'):
      raise DatasetError(f'unknown split {name!r}: use train, val or test')
    return getattr(self, f'{name}_images'), getattr(self, f'{name}_labels')


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler for the CIFAR archives that refuses any global but numpy array rebuilding."""
  _ALLOWED = {
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('_codecs', 'encode'),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f'refusing to load {module}.{name}: a CIFAR pickle holds only numpy arrays')
    return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
  with open(path, 'rb') as f:
    try:
      return _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding='bytes').load()
    except pickle.UnpicklingError as e:
      raise DatasetError(f'{path}: {e}') from e


def _rows_to_nhwc(rows) -> np.ndarray:
  rows = np.asarray(rows, dtype=np.uint8)
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def load_cifar_pickle(name: str, root: str, num_classes: int) -> Dataset:
  """Reads the official python-pickle archive unpacked under ``root``."""
  folder = os.path.join(root, _PICKLE_DIRS[name])
  if name == 'cifar10':
    train_files = sorted(glob.glob(os.path.join(folder, 'data_batch_*')))
    test_files = [os.path.join(folder, 'test_batch')]
    label_key, meta_file, names_key = b'labels', 'batches.meta', b'label_names'
  else:
    train_files = [os.path.join(folder, 'train')]
    test_files = [os.path.join(folder, 'test')]
    label_key, meta_file, names_key = b'fine_labels', 'meta', b'fine_label_names'

  def read(files):
    images, labels = [], []
    for path in files:
      d = _load_pickle(path)
      if b'data' not in d or label_key not in d:
        raise DatasetError(f'{path}: expected keys data and {label_key.decode()}, got '
                           f'{sorted(k.decode() for k in d)}')
      images.append(_rows_to_nhwc(d[b'data']))
      labels.append(np.asarray(d[label_key], dtype=np.int32))
    return np.concatenate(images), np.concatenate(labels)

  train_x, train_y = read(train_files)
  test_x, test_y = read(test_files)
  class_names = ()
  meta_path = os.path.join(folder, meta_file)
  if os.path.exists(meta_path):
    class_names = tuple(n.decode() for n in _load_pickle(meta_path)[names_key])
  return Dataset(name, num_classes, train_x, train_y, test_x, test_y, class_names=class_names)


def load_tfds(name: str, data_dir: str | None, num_classes: int) -> Dataset:
  """Reads the dataset through ``tfds.data_source`` (array-record random access, no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def read(split):
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(e['image'], dtype=np.uint8) for e in examples])
    labels = np.asarray([e['label'] for e in examples], dtype=np.int32)
    return images, labels

  train_x, train_y = read('train')
  test_x, test_y = read('test')
  return Dataset(name, num_classes, train_x, train_y, test_x, test_y)


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits (values 0..16) as uint8 [0, 255], stratified 1437/360 split.

  The split is kept in ``~/.cache/ltd_jax/digits-sklearn-VERSION.npz`` after the first load, so
  that later runs start without importing scikit-learn (seconds); a cache that cannot be read is
  made again, one that cannot be written is skipped."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.expanduser(download.DEFAULT_ROOT),
                      f'digits-sklearn-{importlib.metadata.version("scikit-learn")}.npz')
  try:
    with np.load(path) as f:
      arrays = tuple(f[k] for k in ('train_x', 'train_y', 'test_x', 'test_y'))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    arrays = split_digits()
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      partial = f'{path}.{os.getpid()}.partial.npz'
      np.savez(partial, **dict(zip(('train_x', 'train_y', 'test_x', 'test_y'), arrays)))
      os.replace(partial, path)  # whole or absent, when several processes write it at once
    except OSError:
      pass
  train_x, train_y, test_x, test_y = arrays
  return Dataset('digits', 10, train_x, train_y, test_x, test_y,
                 class_names=tuple(str(i) for i in range(10)))


def split_digits():
  """(train images, train labels, test images, test labels) of the digits, made with
  scikit-learn: ``train_test_split`` stratified, ``DIGITS_TEST_SIZE`` images, seed
  ``DIGITS_SPLIT_SEED``."""
  from sklearn import datasets as skdatasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = skdatasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  return train_x, train_y, test_x, test_y


def candidate_roots(data_dir: str) -> list[str]:
  roots = [data_dir] if data_dir else []
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  roots += [os.path.join(os.getcwd(), 'data'), os.path.join(here, 'data'),
            os.path.expanduser('~/.cache/ltd_jax')]
  return list(dict.fromkeys(roots))


def check(ds: Dataset) -> Dataset:
  for split in ('train', 'test'):
    images, labels = ds.split(split)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise DatasetError(f'{ds.name} {split}: images must be uint8 NHWC, got '
                         f'{images.dtype} {images.shape}')
    if len(images) != len(labels):
      raise DatasetError(f'{ds.name} {split}: {len(images)} images but {len(labels)} labels')
    if len(labels) and (labels.min() < 0 or labels.max() >= ds.num_classes):
      raise DatasetError(f'{ds.name} {split}: labels must lie in [0, {ds.num_classes}), got '
                         f'[{labels.min()}, {labels.max()}]')
  return ds


def hold_out_validation(ds: Dataset, val_size: int, seed: int) -> Dataset:
  """Moves a class-stratified ``val_size`` images from train to a validation split."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  if val_size >= len(ds.train_labels):
    raise DatasetError(f'data.val_size={val_size} must be smaller than the '
                       f'{len(ds.train_labels)} training images')
  idx = np.arange(len(ds.train_labels))
  train_idx, val_idx = model_selection.train_test_split(
      idx, test_size=val_size, stratify=ds.train_labels, random_state=seed)
  train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
  return dataclasses.replace(
      ds, train_images=ds.train_images[train_idx], train_labels=ds.train_labels[train_idx],
      val_images=ds.train_images[val_idx], val_labels=ds.train_labels[val_idx])


def load_cifar(config, spec) -> Dataset:
  """CIFAR-10 / -100 (``config.name``) from the official python pickles under a candidate root
  (``source`` auto or pickle) or through tfds; fails naming every path tried."""
  name, source = config.name, config.source
  if source == 'tfds':
    return load_tfds(name, config.dir, spec.num_classes)
  if source not in ('auto', 'pickle'):
    raise DatasetError(f'unknown data.source {source!r}: use auto, pickle or tfds')
  tried = []
  for root in candidate_roots(config.dir):
    folder = os.path.join(root, _PICKLE_DIRS[name])
    tried.append(folder)
    if os.path.isdir(folder):
      return load_cifar_pickle(name, root, spec.num_classes)
  fetched = fetch_archive(config, spec)
  if fetched is not None:
    return load_cifar_pickle(name, os.path.dirname(fetched), spec.num_classes)
  raise DatasetError(
      f'{name} not found; tried {", ".join(tried)}. Unpack the official python version '
      f'(folder {_PICKLE_DIRS[name]}) under a directory and pass --config.data.dir=DIR, '
      f'let ltd_jax download it (--config.data.download=True), '
      f'or use --config.data.source=tfds to read it through tensorflow-datasets')


def fetch_archive(config, spec) -> str | None:
  """The folder of ``spec.archive`` under ``data.dir`` (default ``~/.cache/ltd_jax``), fetched
  if absent (``download.ensure``; ``data.url`` / ``data.checksum`` override the registry's);
  None when downloading is off or the dataset has no archive."""
  if not config.get('download', False) or spec.archive is None:
    return None
  archive = download.Archive(config.get('url') or spec.archive.url,
                             config.get('checksum') or spec.archive.checksum, spec.archive.folder)
  return download.ensure(config.name, archive, config.dir or download.default_root(),
                         process_index=jax.process_index(), process_count=jax.process_count())


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """Training order for ``epoch``: a pure function of (seed, epoch), so resumed runs agree.
  Cached, so the step loop does not redraw it every step; callers must not modify it."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the global batch used at ``step`` (the last partial batch of an epoch is dropped)."""
  steps_per_epoch = num_examples // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  return epoch_permutation(num_examples, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def random_crop_flip(rng: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Zero-pad by ``padding`` and take a random crop of the original size, then flip half of them.

  Works on a whole batch at once (per-image offsets through ``vmap`` of ``dynamic_slice``).
  """
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * padding + 1)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1, :], cropped)


def augment(rng: jax.Array, images_uint8: jax.Array, kind: str) -> jax.Array:
  """On-device augmentation of a uint8 batch into float32 [0, 1]."""
  images = to_float(images_uint8)
  if kind == 'none':
    return images
  if kind == 'crop_flip':
    return random_crop_flip(rng, images)
  raise ValueError(f'unknown augmentation {kind!r}: use none or crop_flip')
