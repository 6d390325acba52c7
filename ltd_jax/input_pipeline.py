"""Streaming input for datasets larger than memory: ImageNet and Tiny-ImageNet.

Examples are read by random access from a *source* (an image-folder tree, or
``tfds.data_source`` over array-record files: no TensorFlow), decoded with PIL and augmented on
the host by a grain pipeline of worker threads with prefetch. Each host reads only its own rows
of every global batch (``parallel.process_slice``); batch ``s`` is a pure function of
(seed, s), drawn from the same epoch permutation as the in-memory datasets, so a resumed run
reads exactly the batches it would have read.

ImageNet: random-resized-crop (scale 0.08-1, ratio 3/4-4/3, torchvision's algorithm) to
``image_size`` (224) and a horizontal flip on the host; evaluation resizes the shorter side to
``image_size / 0.875`` (256) and takes the centre crop. Tiny-ImageNet: 64x64 images as they
are; the random crop (padding 4) and flip run on the device, as for CIFAR.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import io
import math
import os

import numpy as np

from ltd_jax import data
from ltd_jax import parallel
from ltd_jax.errors import DatasetError

EVAL_CROP_FRACTION = 0.875
_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


@dataclasses.dataclass(frozen=True)
class StreamingSource:
  """Where and how a streamed dataset is read (``datasets.DatasetSpec.options``)."""
  folder: str  # the folder name under data.dir
  tfds_name: str | None
  image_size: int
  host_augment: str  # random_resized_crop | none
  eval_resize: str  # center_crop | none


class FolderSource:
  """``root/train/<class>/**/*.JPEG``; evaluation from ``root/val/<class>/*`` or Tiny-ImageNet's
  ``root/val/images`` + ``val_annotations.txt``. Classes are the sorted training folder names."""

  def __init__(self, root: str, split: str, classes: list[str] | None = None):
    self.root = root
    train_dir = os.path.join(root, 'train')
    self.classes = classes or sorted(d for d in os.listdir(train_dir)
                                     if os.path.isdir(os.path.join(train_dir, d)))
    index = {c: i for i, c in enumerate(self.classes)}
    split_dir = os.path.join(root, split)
    annotations = os.path.join(split_dir, 'val_annotations.txt')
    items = []
    if os.path.exists(annotations):
      with open(annotations) as f:
        for line in f:
          parts = line.split('\t')
          if len(parts) >= 2:
            items.append((os.path.join(split_dir, 'images', parts[0]), parts[1].strip()))
    elif os.path.isdir(split_dir):
      for c in sorted(os.listdir(split_dir)):
        for path in sorted(glob.glob(os.path.join(split_dir, c, '**', '*'), recursive=True)):
          if path.lower().endswith(_IMAGE_EXTENSIONS):
            items.append((path, c))
    unknown = sorted({c for _, c in items if c not in index})
    if unknown:
      raise DatasetError(f'{split_dir}: classes {unknown[:3]} are not training folders of {root}')
    if not items:
      raise DatasetError(f'no images under {split_dir}: expected {split}/<class>/*.JPEG')
    self.paths = [p for p, _ in items]
    self.labels = np.asarray([index[c] for _, c in items], np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    with open(self.paths[i], 'rb') as f:
      return f.read(), int(self.labels[i])


class TfdsSource:
  """``tfds.data_source`` with the image left encoded (decoded by PIL in the pipeline)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                   decoders={'image': tfds.decode.SkipDecoding()})
    self.classes = list(self.source.dataset_info.features['label'].names)
    self._labels = None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    record = self.source[int(i)]
    return record['image'], int(record['label'])

  @property
  def labels(self) -> np.ndarray:
    if self._labels is None:  # one pass over the records, on first use (evaluation splits)
      self._labels = np.asarray([self[i][1] for i in range(len(self))], np.int32)
    return self._labels


def decode(encoded: bytes):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.open(io.BytesIO(encoded)).convert('RGB')


def random_resized_crop(image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's RandomResizedCrop: an area fraction in ``scale`` and log-uniform aspect
  ratio (10 tries, then the centre crop of the clamped ratio), resized bilinearly to size^2."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image.size
  area = width * height
  box = None
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      box = (left, top, left + w, top + h)
      break
  if box is None:
    in_ratio = width / height
    w, h = ((width, round(width / ratio[0])) if in_ratio < ratio[0] else
            (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    box = (left, top, left + w, top + h)
  return np.asarray(image.resize((size, size), Image.BILINEAR, box=box), np.uint8)


def center_crop(image, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Shorter side resized to ``size / crop_fraction``, then the central size x size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image.size
  short = round(size / crop_fraction)
  scale = short / min(width, height)
  w, h = max(size, round(width * scale)), max(size, round(height * scale))
  image = image.resize((w, h), Image.BILINEAR)
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def as_size(image, size: int) -> np.ndarray:
  """The image itself when it is size x size (Tiny-ImageNet), else resized to it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


class LazyImages:
  """An evaluation split's images, decoded only when a batch is read (``np.asarray``)."""

  def __init__(self, dataset: 'StreamingDataset', split: str, indices: np.ndarray):
    self.dataset, self.split, self.indices = dataset, split, indices
    size = dataset.image_size
    self.shape, self.dtype = (len(indices), size, size, 3), np.dtype(np.uint8)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, key) -> 'LazyImages':
    return LazyImages(self.dataset, self.split, self.indices[key])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy
    load = lambda i: self.dataset.load_eval(self.split, int(i))
    with concurrent.futures.ThreadPoolExecutor(self.dataset.num_workers) as pool:
      images = list(pool.map(load, self.indices))
    out = np.stack(images) if images else np.zeros(self.shape, np.uint8)
    return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass
class StreamingDataset:
  """Train / test (/ val) sources of a streamed dataset; ``split`` gives evaluation images
  lazily, ``train_batches`` the host's rows of each global training batch."""
  name: str
  num_classes: int
  source: StreamingSource
  sources: dict
  image_size: int
  num_workers: int
  rrc_scale_min: float
  class_names: tuple[str, ...] = ()
  streaming = True
  train_images = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def num_train(self) -> int:
    return len(self.sources['train'])

  def split(self, name: str):
    if name == 'train' or name not in self.sources:
      raise DatasetError(f'{self.name} has no in-memory {name!r} split to evaluate: use test'
                         + (' (or val)' if 'val' in self.sources else ''))
    labels = self.sources[name].labels
    return LazyImages(self, name, np.arange(len(labels))), labels

  def load_train(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A training image, augmented on the host as the dataset's spec says, and its label."""
    encoded, label = self.sources['train'][index]
    image = decode(encoded)
    if self.source.host_augment == 'random_resized_crop':
      out = random_resized_crop(image, self.image_size, rng, (self.rrc_scale_min, 1.0))
      out = out[:, ::-1] if rng.uniform() < 0.5 else out
    else:
      out = as_size(image, self.image_size)
    return np.ascontiguousarray(out), label

  def load_eval(self, split: str, index: int) -> np.ndarray:
    image = decode(self.sources[split][index][0])
    if self.source.eval_resize == 'center_crop':
      return center_crop(image, self.image_size)
    return as_size(image, self.image_size)


def load_streaming(config, spec) -> StreamingDataset:
  """The streamed dataset ``config.name`` (registry entry ``spec``) from ``config.dir`` (folder
  tree) or through tfds."""
  num_classes, archive, registry_spec, spec = spec.num_classes, spec.archive, spec, spec.options
  source = config.source
  folder_roots = [os.path.join(root, spec.folder) for root in data.candidate_roots(config.dir)]
  root = next((r for r in folder_roots if os.path.isdir(os.path.join(r, 'train'))), None)
  if root is None and source in ('auto', 'folder'):
    root = data.fetch_archive(config, registry_spec)
  if source in ('auto', 'folder') and root is not None:
    train = FolderSource(root, 'train')
    sources = {'train': train, 'test': FolderSource(root, 'val', train.classes)}
    classes = train.classes
  elif source == 'tfds' or (source == 'auto' and spec.tfds_name):
    if not spec.tfds_name:
      raise DatasetError(f'{config.name} has no tfds builder: unpack it under '
                         f'--config.data.dir (folder {spec.folder}/train)')
    try:
      sources = {'train': TfdsSource(spec.tfds_name, 'train', config.dir),
                 'test': TfdsSource(spec.tfds_name, 'validation', config.dir)}
    except Exception as e:  # tfds raises several types for a dataset that is not prepared
      raise DatasetError(f'{config.name}: no folder tree at {", ".join(folder_roots)} and tfds '
                         f'{spec.tfds_name} could not be read ({type(e).__name__}): unpack '
                         f'{spec.folder}/train under --config.data.dir or prepare the tfds '
                         f'dataset in it' + ('' if archive is not None else ' (it is not '
                         'downloaded for you: its licence asks each user to fetch it from '
                         'image-net.org)')) from e
    classes = sources['train'].classes
  else:
    manual = (' (it cannot be downloaded for you: its licence asks each user to fetch it from '
              'image-net.org)' if archive is None else ' or let ltd_jax download it '
              '(--config.data.download=True)')
    raise DatasetError(f'{config.name} not found; tried {", ".join(folder_roots)} (expected '
                       f'{spec.folder}/train/<class>/...): pass --config.data.dir=DIR{manual}')
  if len(classes) != num_classes:
    raise DatasetError(f'{config.name} in {root or config.dir} has {len(classes)} classes, '
                       f'expected {num_classes}: point --config.data.dir at the full dataset')
  return StreamingDataset(config.name, num_classes, spec, sources,
                          config.image_size or spec.image_size, config.num_workers,
                          config.rrc_scale_min, tuple(classes))


def train_batches(ds: StreamingDataset, batch_size: int, seed: int, start_step: int,
                  total_steps: int):
  """Iterator of this host's ``(images uint8 [L, S, S, 3], labels [L])`` for steps
  ``start_step .. total_steps - 1`` (L = batch_size / process count)."""
  import grain  # pylint: disable=g-import-not-at-top
  rows = parallel.process_slice(batch_size)
  local = rows.stop - rows.start
  n = ds.num_train

  def load(k: int):
    step, j = divmod(int(k), local)
    position = rows.start + j
    index = int(data.train_batch_indices(n, batch_size, seed, step)[position])
    image, label = ds.load_train(index, np.random.default_rng([seed, step, position]))
    return image, np.int32(label)

  dataset = (grain.MapDataset.range(start_step * local, total_steps * local)
             .map(load).batch(local, drop_remainder=True))
  options = grain.ReadOptions(num_threads=ds.num_workers, prefetch_buffer_size=2 * local)
  return iter(dataset.to_iter_dataset(options))
