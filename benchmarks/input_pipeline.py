"""Host throughput of the streamed ImageNet input (JPEG decode + random-resized-crop + flip for
training, resize + centre crop for evaluation) against the number of worker threads.

    python benchmarks/input_pipeline.py --workers=1,2 --out=benchmarks/results/NAME.md
    python benchmarks/input_pipeline.py --data_dir=/data --workers=4,8,16   # a real ImageNet

Without ``--data_dir`` it writes a synthetic ImageNet folder tree (1000 classes, one
``--width`` x ``--height`` JPEG each, smooth content at quality 90, about the size of an average
ImageNet photo) to a temporary directory. The training rows time ``input_pipeline.
train_batches`` (the trainer's own iterator, one host's rows of each global batch); the
evaluation rows time decoding test images through ``StreamingDataset.split('test')``. A host
must deliver the accelerators' images/s (``benchmarks/train_step.py``) divided by the host count.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import datasets  # pylint: disable=g-import-not-at-top
from ltd_jax import input_pipeline  # pylint: disable=g-import-not-at-top


def write_synthetic_imagenet(root: str, width: int, height: int, seed: int = 0) -> float:
  """One smooth JPEG per class under root/imagenet/{train,val}/<wnid>/; returns mean KiB."""
  rng = np.random.default_rng(seed)
  sizes = []
  for c in range(datasets.get('imagenet').num_classes):
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), np.uint8))
    photo = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
    photo = np.clip(photo + rng.integers(-8, 9, photo.shape), 0, 255).astype(np.uint8)
    for split in ('train', 'val'):
      folder = os.path.join(root, 'imagenet', split, f'n{c:08d}')
      os.makedirs(folder, exist_ok=True)
      path = os.path.join(folder, f'{split}_{c}.JPEG')
      Image.fromarray(photo).save(path, quality=90)
      sizes.append(os.path.getsize(path))
  return float(np.mean(sizes)) / 1024


def time_train(ds, batch: int, batches: int) -> float:
  """images/s of train_batches after its first batch (thread start-up and prefetch fill)."""
  it = input_pipeline.train_batches(ds, batch, seed=0, start_step=0, total_steps=batches + 1)
  next(it)
  start = time.perf_counter()
  count = sum(images.shape[0] for images, _ in it)
  return count / (time.perf_counter() - start)


def time_eval(ds, batch: int, batches: int) -> float:
  images, _ = ds.split('test')
  n = min(len(images), batch * batches)
  start = time.perf_counter()
  for lo in range(0, n, batch):
    np.asarray(images[np.arange(lo, min(lo + batch, n))])
  return n / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--data_dir', default='', help='a real ImageNet (folder tree or prepared tfds)')
  p.add_argument('--workers', default='1,2', help='comma-separated data.num_workers values')
  p.add_argument('--batch', type=int, default=128, help="one host's rows of a batch")
  p.add_argument('--batches', type=int, default=6, help='timed batches (after one warm-up)')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--width', type=int, default=500)
  p.add_argument('--height', type=int, default=375)
  p.add_argument('--out', default='', help='also write the table to this Markdown file')
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    if args.data_dir:
      root, what = args.data_dir, f'ImageNet at {args.data_dir}'
    else:
      kib = write_synthetic_imagenet(tmp, args.width, args.height)
      root = tmp
      what = (f'synthetic ImageNet tree: 1000 classes, {args.width}x{args.height} JPEGs of '
              f'{kib:.0f} KiB on average')
    rows = []
    for workers in (int(w) for w in args.workers.split(',')):
      config = config_lib.default_config().data
      config.name, config.dir, config.num_workers = 'imagenet', root, workers
      config.image_size = args.image_size
      ds = datasets.load(config)
      rows.append((workers, time_train(ds, args.batch, args.batches),
                   time_eval(ds, args.batch, args.batches)))
      print(f'{workers} workers: train {rows[-1][1]:.0f} images/s, eval {rows[-1][2]:.0f}',
            file=sys.stderr, flush=True)

  lines = common.header_lines() + [
      f'data: {what}; crops {args.image_size}x{args.image_size}, batch {args.batch}, '
      f'{args.batches} timed batches after one',
      '',
      '| data.num_workers | train images/s (decode + random-resized-crop + flip) '
      '| eval images/s (decode + resize + centre crop) | train images/s per worker |',
      '|---:|---:|---:|---:|',
  ]
  lines += [f'| {w} | {t:.0f} | {e:.0f} | {t / w:.0f} |' for w, t, e in rows]
  common.emit_table(lines, args.out)


if __name__ == '__main__':
  main()
