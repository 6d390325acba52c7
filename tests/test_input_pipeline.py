"""Streaming ImageNet / Tiny-ImageNet input: folder sources, crops, per-host batches, resume,
and the two large-dataset configs trained end to end on mock folder trees."""

import io
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import input_pipeline
from ltd_jax import train
from ltd_jax.errors import DatasetError
from tests.conftest import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(path, rng, size):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def mock_tiny_imagenet(root, classes=200, per_class=2, val_per_class=1):
  """The official tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images +
  val_annotations.txt."""
  rng = np.random.default_rng(0)
  base = os.path.join(root, 'tiny-imagenet-200')
  wnids = [f'n{i:08d}' for i in range(classes)]
  lines = []
  for c, w in enumerate(wnids):
    for k in range(per_class):
      _jpeg(os.path.join(base, 'train', w, 'images', f'{w}_{k}.JPEG'), rng, (64, 64))
    for k in range(val_per_class):
      name = f'val_{c * val_per_class + k}.JPEG'
      _jpeg(os.path.join(base, 'val', 'images', name), rng, (64, 64))
      lines.append(f'{name}\t{w}\t0\t0\t63\t63\n')
  with open(os.path.join(base, 'val', 'val_annotations.txt'), 'w') as f:
    f.writelines(lines)
  return base, wnids


def mock_imagenet(root, classes=1000):
  """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG with images of varied sizes."""
  rng = np.random.default_rng(1)
  base = os.path.join(root, 'imagenet')
  for c in range(classes):
    w = f'n{c:08d}'
    size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    _jpeg(os.path.join(base, 'train', w, f'{w}_0.JPEG'), rng, size)
    _jpeg(os.path.join(base, 'val', w, f'ILSVRC2012_val_{c:08d}.JPEG'), rng, size)
  return base


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  mock_tiny_imagenet(str(root))
  return str(root)


def _data_config(name, root, **kw):
  c = config_lib.default_config().data
  c.name, c.dir, c.num_workers = name, root, 4
  for k, v in kw.items():
    c[k] = v
  return c


def test_random_resized_crop_of_the_full_square_is_a_plain_resize():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8))
  out = input_pipeline.random_resized_crop(img, 24, np.random.default_rng(0), (1.0, 1.0),
                                           (1.0, 1.0))
  np.testing.assert_array_equal(out, np.asarray(img.resize((24, 24), Image.BILINEAR)))


def test_random_resized_crop_covers_the_scale_range_and_is_seeded():
  # A horizontal ramp: the crop's mean column tells where it was cut from.
  ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (200, 1, 3))
  img = Image.fromarray(ramp)
  crops = [input_pipeline.random_resized_crop(img, 16, np.random.default_rng(s)) for s in range(40)]
  assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
  spans = [int(c[0, -1, 0]) - int(c[0, 0, 0]) for c in crops]
  assert min(spans) < 80 and max(spans) > 150  # small and large area fractions both occur
  again = input_pipeline.random_resized_crop(img, 16, np.random.default_rng(3))
  np.testing.assert_array_equal(again, crops[3])


def test_center_crop_resizes_the_shorter_side_to_256_then_crops_224():
  img = Image.fromarray(np.zeros((200, 300, 3), np.uint8))
  out = input_pipeline.center_crop(img, 224)
  assert out.shape == (224, 224, 3)
  ramp = np.tile(np.arange(300, dtype=np.uint8)[None, :, None] // 2, (200, 1, 3))
  out = input_pipeline.center_crop(Image.fromarray(ramp), 224)
  # 300 x 200 -> 384 x 256; the crop's central column is the image's central column (75).
  assert abs(int(out[112, 112, 0]) - 75) <= 1


def test_tiny_imagenet_folder_layout(tiny_root):
  ds = datasets.load(_data_config('tiny_imagenet', tiny_root))
  assert ds.streaming and ds.num_classes == 200 and ds.num_train == 400
  assert ds.image_shape == (64, 64, 3)
  images, labels = ds.split('test')
  assert len(images) == 200 and sorted(labels) == list(range(200))
  batch = np.asarray(images[np.array([5, 7])])
  assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8
  encoded, label = ds.sources['test'][7]
  np.testing.assert_array_equal(batch[1], np.asarray(input_pipeline.decode(encoded)))
  assert label == labels[7] == 7


def test_train_batches_follow_the_epoch_permutation_and_resume(tiny_root):
  ds = datasets.load(_data_config('tiny_imagenet', tiny_root))
  batches = list(input_pipeline.train_batches(ds, 8, seed=3, start_step=0, total_steps=3))
  assert len(batches) == 3
  for step, (images, labels) in enumerate(batches):
    idx = data.train_batch_indices(ds.num_train, 8, 3, step)
    np.testing.assert_array_equal(labels, ds.sources['train'].labels[idx])
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
  resumed = next(input_pipeline.train_batches(ds, 8, seed=3, start_step=2, total_steps=3))
  np.testing.assert_array_equal(resumed[0], batches[2][0])


def test_each_host_reads_only_its_rows_of_a_streamed_batch(tiny_root, monkeypatch):
  """Two processes (jax.process_index 0 and 1 of 2): each decodes only its half of every global
  batch's rows, and the halves put together are the one-process batch, pixel for pixel."""
  ds = datasets.load(_data_config('tiny_imagenet', tiny_root))
  single = list(input_pipeline.train_batches(ds, 8, seed=3, start_step=0, total_steps=3))
  source = ds.sources['train']

  class Recording:
    labels = source.labels

    def __init__(self):
      self.read = []

    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      self.read.append(int(i))
      return source[i]

  halves = []
  for pid in (0, 1):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda pid=pid: pid)
    ds.sources['train'] = recording = Recording()
    halves.append(list(input_pipeline.train_batches(ds, 8, seed=3, start_step=0, total_steps=3)))
    want = [int(i) for step in range(3)
            for i in data.train_batch_indices(ds.num_train, 8, 3, step)[pid * 4:(pid + 1) * 4]]
    assert sorted(recording.read) == sorted(want), pid
  for step in range(3):
    for part in (0, 1):  # images, labels
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][part], halves[1][step][part]]), single[step][part])


def test_imagenet_crops_are_random_per_step_and_fixed_per_seed(tmp_path):
  root = str(tmp_path)
  mock_imagenet(root)
  ds = datasets.load(_data_config('imagenet', root, image_size=32))
  assert ds.num_classes == 1000 and ds.image_shape == (32, 32, 3)
  a = next(input_pipeline.train_batches(ds, 4, seed=0, start_step=0, total_steps=1))[0]
  b = next(input_pipeline.train_batches(ds, 4, seed=0, start_step=0, total_steps=1))[0]
  np.testing.assert_array_equal(a, b)
  test_images, _ = ds.split('test')
  assert np.asarray(test_images[np.arange(3)]).shape == (3, 32, 32, 3)


def _colour(label):
  return np.array([label * 37 % 256, label * 11 % 256, label * 5 % 256], np.uint8)


def _colour_error(images, labels) -> float:
  """Largest gap between an image's mean colour and its label's colour."""
  return np.abs(images.mean(axis=(1, 2)) - np.stack([_colour(l) for l in labels])).max()


def mock_imagenet2012_tfds(data_dir, labels):
  """Prepares tfds's own ``imagenet2012`` builder (its features, version and 1000 label names)
  in ``data_dir`` as array-record files, as ``download_and_prepare`` on the real archives
  would, but from solid-colour JPEGs whose colour encodes the label. Needs no TensorFlow."""
  tfds = pytest.importorskip('tensorflow_datasets')
  rng = np.random.default_rng(2)

  def examples(split):
    for i, label in enumerate(labels[split]):
      size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
      buffer = io.BytesIO()
      Image.fromarray(np.broadcast_to(_colour(label), size + (3,))).save(buffer, format='JPEG')
      yield f'{split}_{i}', {'image': buffer.getvalue(), 'label': int(label),
                             'file_name': f'{split}_{i}.JPEG'}

  class PreparedImagenet2012(type(tfds.builder('imagenet2012')), skip_registration=True):
    name = 'imagenet2012'
    url_infos = None  # nothing to download

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: examples(split) for split in labels}

  PreparedImagenet2012(data_dir=data_dir, file_format='array_record').download_and_prepare()


def test_imagenet_from_a_prepared_tfds_dataset_without_tensorflow(tmp_path):
  labels = {'train': [(83 * i) % 1000 for i in range(12)], 'validation': [999, 0, 512, 7, 64]}
  mock_imagenet2012_tfds(str(tmp_path), labels)
  assert 'tensorflow' not in sys.modules
  ds = datasets.load(_data_config('imagenet', str(tmp_path), image_size=32))  # source auto
  assert isinstance(ds.sources['train'], input_pipeline.TfdsSource)
  assert ds.num_classes == 1000 and ds.num_train == 12 and ds.image_shape == (32, 32, 3)
  assert ds.class_names[0] == 'n01440764' and ds.class_names[999] == 'n15075141'
  records = ds.sources['train']  # tfds stores the records in its own (shuffled) order
  assert sorted(records[i][1] for i in range(12)) == sorted(labels['train'])
  batches = list(input_pipeline.train_batches(ds, 4, seed=5, start_step=0, total_steps=3))
  for step, (images, batch_labels) in enumerate(batches):
    idx = data.train_batch_indices(12, 4, 5, step)
    np.testing.assert_array_equal(batch_labels, [records[i][1] for i in idx])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    # Every crop of a solid-colour image is that colour: images stay with their labels.
    assert _colour_error(images, batch_labels) < 4
  test_images, test_labels = ds.split('test')
  assert sorted(test_labels) == sorted(labels['validation'])
  evaluated = np.asarray(test_images[np.arange(5)])
  assert evaluated.shape == (5, 32, 32, 3)
  assert _colour_error(evaluated, test_labels) < 4
  assert 'tensorflow' not in sys.modules
  # The trainer on it: streamed training batches, lazily decoded evaluation images.
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs',
                                                    'natural_imagenet_resnet50.py'))
  apply_overrides(config, {**SMALL, 'data.dir': str(tmp_path), 'data.image_size': 16,
                           'model.name': 'small_cnn', 'model.width': 4, 'optim.lr': 1e-3,
                           'eval.during_training': ('clean',), 'eval.final': ('clean',)})
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  assert results['num_examples'] == 5 and results['class_names'][0] == 'n01440764'
  assert len(results['attacks']['clean']['per_class']) == 1000


def test_missing_and_partial_datasets_name_the_paths(tmp_path):
  with pytest.raises(DatasetError, match=r'tiny_imagenet not found; tried .*tiny-imagenet-200'):
    datasets.load(_data_config('tiny_imagenet', str(tmp_path), download=False))
  mock_tiny_imagenet(str(tmp_path), classes=3)
  with pytest.raises(DatasetError, match='has 3 classes, expected 200'):
    datasets.load(_data_config('tiny_imagenet', str(tmp_path)))


def _stage_config(tmp_path, name, module, overrides):
  path = tmp_path / f'{name}.py'
  body = '\n'.join(f'  c.{k} = {v!r}' for k, v in overrides.items())
  path.write_text(f'from ltd_jax.configs import {module}\n\n\ndef get_config():\n'
                  f'  c = {module}.get_config()\n{body}\n  return c\n')
  return str(path)


SMALL = {'max_steps': 2, 'batch_size': 4, 'attack.steps': 1, 'eval.subset_size': 8,
         'eval.final_subset_size': 8, 'eval.batch_size': 8, 'eval.pgd_steps': 1,
         'eval.cw_steps': 1, 'progress_bar': False, 'data.num_workers': 4,
         'eval.during_training': ('clean', 'pgd20'), 'eval.final': ('clean', 'pgd20')}


@pytest.mark.parametrize('student', [
    # The config's PreAct ResNet-18 teacher and student compile for over a minute on 2 cores
    # beside another test process: slow. The fast equivalent runs the same config, teacher stage
    # and streamed pipeline with small CNNs; PreAct ResNet-18 itself is checked in test_models
    # and test_interchange.
    pytest.param('preactresnet18', marks=pytest.mark.slow), 'small_cnn'])
def test_absld_tinyimagenet_config_trains_on_mock_data(tiny_root, tmp_path, student):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'absld_tinyimagenet.py'))
  assert config.model.name == 'preactresnet18'
  model = ({'model.base_width': 4} if student == 'preactresnet18'
           else {'model.name': 'small_cnn', 'model.width': 4})
  teacher = _stage_config(tmp_path, 'teacher', 'trades_tinyimagenet', {**SMALL, **model})
  apply_overrides(config, {**SMALL, **model, 'data.dir': tiny_root, 'teacher.config': teacher})
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  assert os.path.exists(tmp_path / 'run' / 'teacher' / 'results.json')
  assert os.path.exists(tmp_path / 'run' / 'results.json')


@pytest.mark.parametrize('student', [
    # ResNet-50's LTD step compiles for about a minute on 2 cores: slow. Its fast equivalent is
    # the same config and pipeline with a small student, and ResNet-50 itself against
    # torchvision (keys, shapes, logits) in test_interchange.
    pytest.param('resnet50', marks=pytest.mark.slow), 'small_cnn'])
def test_ltd_imagenet_resnet50_config_trains_on_mock_data(tmp_path, student):
  root = str(tmp_path / 'data')
  mock_imagenet(root)
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'ltd_imagenet_resnet50.py'))
  assert config.model.name == 'resnet50' and config.data.image_size == 224
  # lr 0.1 at a batch of 4 over 1000 classes makes the logits explode within two steps. The
  # teacher stage is the config's own, with a small CNN: ResNet-50 is compiled once, as student.
  teacher = _stage_config(tmp_path, 'teacher', 'natural_imagenet_resnet50',
                          {**SMALL, 'max_steps': 1, 'optim.lr': 1e-3, 'model.name': 'small_cnn',
                           'model.width': 4})
  apply_overrides(config, {**SMALL, 'data.dir': root, 'data.image_size': 32,
                           'teacher.config': teacher, 'optim.lr': 1e-3,
                           'eval.during_training': ('clean',), 'eval.final': ('clean',),
                           'eval.selection': 'last'})
  if student != 'resnet50':
    config.model.name, config.model.width = student, 4
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  if student == 'resnet50':
    assert state.params['fc']['kernel'].shape == (2048, 1000)
  else:
    assert jax.tree_util.tree_leaves(state.params)[-1].shape[-1] == 1000
