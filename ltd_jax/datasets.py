"""The dataset registry: one ``DatasetSpec`` per dataset, behind ``load(config.data)``.

A spec says what the rest of the library needs to know of a dataset: its classes, its image
shape, its default on-device augmentation and the loader that reads it, in memory
(``data.Dataset``: digits, CIFAR) or streamed image by image (``input_pipeline``: ImageNet,
Tiny-ImageNet). Adding a dataset is one ``register`` call (docs/extending.md);
``config_lib.validate`` takes its choices from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ltd_jax import data
from ltd_jax import download
from ltd_jax import generated
from ltd_jax import input_pipeline
from ltd_jax.errors import DatasetError

AUGMENTATIONS = ('none', 'crop_flip')  # on-device (data.augment); ImageNet crops on the host


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """``load(config.data, spec)`` returns a ``data.Dataset`` (in memory) or an
  ``input_pipeline.StreamingDataset`` (``streaming``); ``image_shape`` is the shape trained on
  (streamed: at the default ``data.image_size``); ``options`` is the loader's own (the folder
  and tfds names of a streamed dataset). ``train_size`` and ``test_size`` are the official
  splits' sizes, which ``--mode=compile`` plans with before any image is on disk."""
  num_classes: int
  image_shape: tuple[int, int, int]
  augment: str
  load: Callable[[Any, 'DatasetSpec'], Any]
  streaming: bool = False
  options: Any = None
  train_size: int = 0
  test_size: int = 0
  archive: download.Archive | None = None  # fetched on first use (data.download)


REGISTRY: dict[str, DatasetSpec] = {}


def register(name: str, spec: DatasetSpec) -> None:
  if spec.augment not in AUGMENTATIONS:
    raise ValueError(f'dataset {name}: augment must be one of {AUGMENTATIONS}, got {spec.augment!r}')
  REGISTRY[name] = spec


def get(name: str) -> DatasetSpec:
  if name not in REGISTRY:
    raise DatasetError(f'unknown dataset {name!r}: choose one of {sorted(REGISTRY)}')
  return REGISTRY[name]


def load(config):
  """Loads ``config`` (the config's ``data`` section: name, source, dir, val_size); in-memory
  datasets are checked and get their validation split and their generated images
  (``data.generated_path``) here."""
  spec = get(config.name)
  ds = spec.load(config, spec)
  if spec.streaming:
    return ds
  ds = data.check(ds)
  if config.get('val_size', 0):
    ds = data.hold_out_validation(ds, int(config.val_size), seed=int(config.get('split_seed', 0)))
  if config.get('generated_required', False) and not config.get('generated_path', ''):
    raise DatasetError('this config mixes generated images into every batch: pass '
                       '--config.data.generated_path=FILE.npz (e.g. cifar10/1m.npz of '
                       'https://huggingface.co/datasets/P2333/DM-Improves-AT), or set '
                       '--config.data.generated_required=False to train on the real images alone')
  if config.get('generated_path', ''):
    ds = dataclasses.replace(ds, generated=generated.load(config, ds.image_shape, ds.num_classes))
  return ds


def default_augmentation(name: str) -> str:
  return get(name).augment


register('digits', DatasetSpec(10, (8, 8, 1), 'none', lambda config, spec: data.load_digits(),
                               train_size=1797 - data.DIGITS_TEST_SIZE,
                               test_size=data.DIGITS_TEST_SIZE))
# The published MD5s of the official python archives (www.cs.toronto.edu/~kriz/cifar.html).
register('cifar10', DatasetSpec(
    10, (32, 32, 3), 'crop_flip', data.load_cifar, train_size=50000, test_size=10000,
    archive=download.Archive('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                             'md5:c58f30108f718f92721af3b95e74349a', 'cifar-10-batches-py')))
register('cifar100', DatasetSpec(
    100, (32, 32, 3), 'crop_flip', data.load_cifar, train_size=50000, test_size=10000,
    archive=download.Archive('https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
                             'md5:eb9058c3a382ffc7106e4002c42a8d85', 'cifar-100-python')))
register('imagenet', DatasetSpec(
    1000, (224, 224, 3), 'none', input_pipeline.load_streaming, streaming=True,
    options=input_pipeline.StreamingSource('imagenet', 'imagenet2012', 224, 'random_resized_crop',
                                           'center_crop'),
    train_size=1281167, test_size=50000))
register('tiny_imagenet', DatasetSpec(
    200, (64, 64, 3), 'crop_flip', input_pipeline.load_streaming, streaming=True,
    options=input_pipeline.StreamingSource('tiny-imagenet-200', None, 64, 'none', 'none'),
    train_size=100000, test_size=10000,
    # Stanford publishes no checksum: this MD5 is the one torchvision-style loaders record for
    # the 248,100,043-byte zip (no SHA-256 of it could be computed here, offline).
    archive=download.Archive('http://cs231n.stanford.edu/tiny-imagenet-200.zip',
                             'md5:90528d7ca1a48142e341f4ef8d21d0de', 'tiny-imagenet-200')))
