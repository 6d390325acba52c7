"""Generated images mixed into the real training set (Gowal et al. 2021; Wang et al. 2023,
wzekai99/DM-Improves-AT): the source that reads the published archives and the mixture.

Archives are ``.npz`` files holding uint8 ``image`` [N, H, W, 3] and integer ``label`` [N], one
file or several shards (``data.generated_path``: a path, a glob, or comma-separated paths). They
are never loaded whole: an array stored uncompressed inside the zip (``np.savez``, as the
published 1M-50M archives are written) is memory-mapped at its offset in the file; a compressed
one (``np.savez_compressed``) is converted once to ``FILE.image.npy`` beside it, which the next
run maps directly. Labels (8 bytes an image) are read into memory.

The mixture: every global batch of B holds ``g = int(B * data.generated_fraction)`` generated
images drawn uniformly with replacement (the code's ``torch.randint``) and ``B - g`` real ones
that follow their own permutation, each real image once per pass, passes running on across epoch
ends; the batch is then shuffled. An epoch is ``ceil(num_real / B)`` batches (the code's
``SemiSupervisedSampler(num_batches=ceil(dataset_size / batch_size))``), so one epoch sees only
``B - g`` of every B real images. Batch s is a pure function of (seed, s), and every host reads
only its own rows of it.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import struct
import zipfile

import numpy as np

from ltd_jax import data
from ltd_jax.errors import DatasetError

_LOCAL_HEADER = struct.Struct('<4s5H3L2H')  # a zip local file header, 30 bytes
_GENERATED_STREAM, _SHUFFLE_STREAM = 101, 102  # rng streams beside the real permutation's


def shard_paths(spec: str) -> list[str]:
  """The archive files of ``data.generated_path``: comma-separated paths or globs, in order
  (a glob's matches sorted); a path that names no file stops with one line."""
  paths = []
  for part in (p.strip() for p in spec.split(',') if p.strip()):
    if any(ch in part for ch in '*?['):
      matches = sorted(glob.glob(os.path.expanduser(part)))
      if not matches:
        raise DatasetError(f'data.generated_path: no file matches {part}: check the pattern')
      paths += matches
    else:
      path = os.path.expanduser(part)
      if not os.path.isfile(path):
        raise DatasetError(f'generated-image shard {path} not found: download it or fix '
                           f'--config.data.generated_path')
      paths.append(path)
  return paths


def _npy_in_zip(path: str, zf: zipfile.ZipFile, member: str) -> np.ndarray:
  """The array ``member`` of an open ``.npz``, memory-mapped where the zip stores it
  uncompressed; a compressed member is first extracted to ``PATH.<name>.npy`` beside it."""
  info = zf.getinfo(member)
  if info.compress_type != zipfile.ZIP_STORED:
    converted = f'{os.path.splitext(path)[0]}.{member}'
    if not os.path.exists(converted):
      print(f'{path}: {member} is compressed, so it cannot be memory-mapped; converting it once '
            f'to {converted} (later runs map that file)', flush=True)
      partial = f'{converted}.partial{os.getpid()}'  # hosts sharing the folder may race
      with zf.open(member) as src, open(partial, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      os.replace(partial, converted)
    return np.load(converted, mmap_mode='r')
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if header[0] != b'PK\x03\x04':
      raise DatasetError(f'{path}: {member} has no zip header where the directory says: the '
                         f'archive is damaged; download it again')
    name_len, extra_len = header[-2], header[-1]
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(offset)
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
      raise DatasetError(f'{path}: {member} is a .npy of format {version}, which this reader '
                         f'does not map: rewrite the archive with np.savez')
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
      raise DatasetError(f'{path}: {member} holds Python objects, not numbers')
    return np.memmap(path, dtype=dtype, mode='r', offset=f.tell(), shape=shape,
                     order='F' if fortran else 'C')


class GeneratedImages:
  """The shards of ``data.generated_path`` as one indexable set: ``images(indices)`` reads only
  those rows; ``labels`` holds every label."""

  def __init__(self, paths: list[str], image_shape: tuple[int, ...], num_classes: int):
    self.paths, self.shards, labels = list(paths), [], []
    for path in self.paths:
      try:
        zf = zipfile.ZipFile(path)
      except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f'{path} is not a readable .npz archive ({e}): download it again')
      with zf:
        names = set(zf.namelist())
        missing = [k for k in ('image', 'label') if f'{k}.npy' not in names]
        if missing:
          raise DatasetError(f'{path} has no {" or ".join(missing)} array (it holds '
                             f'{sorted(n[:-4] for n in names)}): a generated-image archive '
                             f'holds uint8 image [N, H, W, C] and integer label [N]')
        images = _npy_in_zip(path, zf, 'image.npy')
        shard_labels = np.asarray(_npy_in_zip(path, zf, 'label.npy'))
      if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f'{path}: image must be uint8 [N, H, W, C], got {images.dtype} '
                           f'{list(images.shape)}')
      if tuple(images.shape[1:]) != tuple(image_shape):
        raise DatasetError(f'{path}: images of shape {list(images.shape[1:])}, but the real '
                           f'training set has {list(image_shape)}: use the archive of this dataset')
      if shard_labels.ndim != 1 or not np.issubdtype(shard_labels.dtype, np.integer):
        raise DatasetError(f'{path}: label must be an integer vector, got {shard_labels.dtype} '
                           f'{list(shard_labels.shape)}')
      if len(shard_labels) != len(images):
        raise DatasetError(f'{path}: {len(images)} images but {len(shard_labels)} labels')
      if len(shard_labels) and (shard_labels.min() < 0 or shard_labels.max() >= num_classes):
        raise DatasetError(f'{path}: labels must lie in [0, {num_classes}), got '
                           f'[{shard_labels.min()}, {shard_labels.max()}]: use the archive of '
                           f'this dataset')
      self.shards.append(images)
      labels.append(shard_labels.astype(np.int32))
    self.labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    if not len(self.labels):
      raise DatasetError(f'{", ".join(self.paths)} hold no images')
    self.starts = np.cumsum([0] + [len(s) for s in self.shards])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def images(self, indices: np.ndarray) -> np.ndarray:
    """The images at ``indices`` (any order, repeats allowed), read shard by shard in sorted
    order (sequential reads of the mapped files)."""
    indices = np.asarray(indices, np.int64)
    out = np.empty((len(indices), *self.shards[0].shape[1:]), np.uint8)
    shard = np.searchsorted(self.starts, indices, side='right') - 1
    for s in np.unique(shard):
      where = np.nonzero(shard == s)[0]
      local = indices[where] - self.starts[s]
      order = np.argsort(local, kind='stable')
      out[where[order]] = self.shards[s][local[order]]
    return out


def load(config, image_shape, num_classes: int) -> GeneratedImages | None:
  """The generated images of ``config`` (the config's ``data`` section), or None."""
  spec = config.get('generated_path', '')
  if not spec:
    return None
  return GeneratedImages(shard_paths(spec), image_shape, num_classes)


def steps_per_epoch(num_real: int, batch_size: int) -> int:
  """``ceil(num_real / batch_size)``: the code's epoch of a mixed run."""
  return math.ceil(num_real / batch_size)


def real_rows(num_real: int, per_batch: int, seed: int, step: int) -> np.ndarray:
  """The real images of batch ``step``: positions ``[step * r, (step + 1) * r)`` of the passes
  over the real set laid end to end, pass p in ``data.epoch_permutation(num_real, seed, p)``."""
  positions = step * per_batch + np.arange(per_batch, dtype=np.int64)
  passes, offsets = np.divmod(positions, num_real)
  out = np.empty((per_batch,), np.int64)
  for p in np.unique(passes):
    where = passes == p
    out[where] = data.epoch_permutation(num_real, seed, int(p))[offsets[where]]
  return out


def batch_plan(num_real: int, num_generated: int, batch_size: int, fraction: float, seed: int,
               step: int) -> tuple[np.ndarray, np.ndarray]:
  """``(is_generated [B] bool, index [B])`` of global batch ``step``: the row of the real set
  or of the generated images at each position."""
  g = int(batch_size * fraction)
  real = real_rows(num_real, batch_size - g, seed, step)
  gen = np.random.default_rng([seed, _GENERATED_STREAM, step]).integers(0, num_generated, g)
  is_generated = np.concatenate([np.zeros(batch_size - g, bool), np.ones(g, bool)])
  index = np.concatenate([real, gen])
  order = np.random.default_rng([seed, _SHUFFLE_STREAM, step]).permutation(batch_size)
  return is_generated[order], index[order]


def load_rows(real_images: np.ndarray, real_labels: np.ndarray, generated: GeneratedImages,
              is_generated: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of the planned rows ``(is_generated, index)`` (a host's slice)."""
  images = np.empty((len(index), *real_images.shape[1:]), np.uint8)
  labels = np.empty((len(index),), np.int32)
  real = ~is_generated
  images[real], labels[real] = real_images[index[real]], real_labels[index[real]]
  images[is_generated] = generated.images(index[is_generated])
  labels[is_generated] = generated.labels[index[is_generated]]
  return images, labels
