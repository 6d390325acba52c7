"""Generated images (ltd_jax/generated.py): the .npz reader, bad archives, and the mixture."""

import json
import os

import jax
import numpy as np
import pytest

from ltd_jax import datasets
from ltd_jax import generated
from ltd_jax import parallel
from ltd_jax import train
from ltd_jax.errors import DatasetError


def _archive(path, n, shape=(8, 8, 1), num_classes=10, seed=0, compressed=False, **override):
  rng = np.random.default_rng(seed)
  arrays = {'image': rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            'label': rng.integers(0, num_classes, n).astype(np.int64)}
  arrays.update(override)
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return arrays


def test_shards_are_read_by_offset_or_converted_once(tmp_path, capsys):
  a = _archive(tmp_path / 'part1.npz', 50, seed=1)
  b = _archive(tmp_path / 'part2.npz', 30, seed=2, compressed=True)
  gen = generated.load(_data_config(f'{tmp_path}/part*.npz'), (8, 8, 1), 10)
  assert len(gen) == 80 and gen.paths == [str(tmp_path / 'part1.npz'), str(tmp_path / 'part2.npz')]
  assert isinstance(gen.shards[0], np.memmap)  # stored: mapped inside the zip, not loaded
  for shard in gen.shards:  # mapped read-only: nothing in a run can write into the archive
    assert not shard.flags.writeable
    with pytest.raises(ValueError, match='read-only'):
      shard[0, 0, 0, 0] = 1
  assert 'converting it once' in capsys.readouterr().out
  assert os.path.exists(tmp_path / 'part2.image.npy')
  all_images = np.concatenate([a['image'], b['image']])
  all_labels = np.concatenate([a['label'], b['label']])
  idx = np.array([79, 0, 51, 49, 50, 3, 3, 60])
  np.testing.assert_array_equal(gen.images(idx), all_images[idx])
  np.testing.assert_array_equal(gen.labels, all_labels)
  # The second run maps the converted file and says nothing.
  again = generated.load(_data_config(f'{tmp_path}/part1.npz, {tmp_path}/part2.npz'), (8, 8, 1), 10)
  assert capsys.readouterr().out == ''
  np.testing.assert_array_equal(again.images(idx), all_images[idx])


def _data_config(path, **kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({'generated_path': str(path), **kw})


@pytest.mark.parametrize('case, expected', [
    ('shape', r'bad\.npz: images of shape \[9, 9, 1\]'),
    ('dtype', r'bad\.npz: image must be uint8'),
    ('range', r'bad\.npz: labels must lie in \[0, 10\)'),
    ('length', r'bad\.npz: 20 images but 19 labels'),
    ('member', r'bad\.npz has no label array'),
    ('zip', r'bad\.npz is not a readable \.npz'),
    ('missing', r'shard .*absent\.npz not found'),
])
def test_bad_archives_stop_with_one_line_naming_the_file(tmp_path, case, expected):
  path = tmp_path / 'bad.npz'
  if case == 'shape':
    _archive(path, 20, shape=(9, 9, 1))
  elif case == 'dtype':
    _archive(path, 20, image=np.zeros((20, 8, 8, 1), np.float32))
  elif case == 'range':
    _archive(path, 20, label=np.full(20, 10))
  elif case == 'length':
    _archive(path, 20, label=np.zeros(19, np.int64))
  elif case == 'member':
    np.savez(path, image=np.zeros((20, 8, 8, 1), np.uint8))
  elif case == 'zip':
    path.write_bytes(b'not a zip')
  spec = f'{path},{tmp_path / "absent.npz"}' if case == 'missing' else path
  if case == 'missing':
    _archive(path, 20)
  with pytest.raises(DatasetError, match=expected) as e:
    generated.load(_data_config(spec), (8, 8, 1), 10)
  assert '\n' not in str(e.value)


def test_mixture_fraction_passes_purity_and_hosts():
  num_real, num_gen, batch, fraction, seed = 37, 500, 16, 0.7, 3
  g = int(batch * fraction)
  real_seen = []
  for step in range(12):
    is_gen, index = generated.batch_plan(num_real, num_gen, batch, fraction, seed, step)
    again = generated.batch_plan(num_real, num_gen, batch, fraction, seed, step)
    np.testing.assert_array_equal(is_gen, again[0])  # a pure function of (seed, step)
    np.testing.assert_array_equal(index, again[1])
    assert is_gen.sum() == g  # exact in every batch
    assert index[is_gen].max() < num_gen and index[~is_gen].max() < num_real
    real_seen.append(index[~is_gen])
  # Shuffled: the generated images are not all at the end.
  assert any(not generated.batch_plan(num_real, num_gen, batch, fraction, seed, s)[0][-g:].all()
             for s in range(12))
  # Every real image once per pass over the real set, passes running on across batches.
  stream = np.concatenate([generated.real_rows(num_real, batch - g, seed, s) for s in range(12)])
  for p in range(len(stream) // num_real):
    assert sorted(stream[p * num_real:(p + 1) * num_real]) == list(range(num_real))
  np.testing.assert_array_equal(np.sort(np.concatenate(real_seen)), np.sort(stream))
  # Another seed, another order.
  other = generated.batch_plan(num_real, num_gen, batch, fraction, seed + 1, 0)[1]
  assert not np.array_equal(other, generated.batch_plan(num_real, num_gen, batch, fraction,
                                                         seed, 0)[1])


def test_each_host_reads_only_its_rows(tmp_path):
  _archive(tmp_path / 'g.npz', 200)
  gen = generated.load(_data_config(tmp_path / 'g.npz'), (8, 8, 1), 10)
  requested = []
  read = gen.images
  gen.images = lambda idx: requested.append(np.asarray(idx)) or read(idx)
  real_images = np.arange(30 * 64, dtype=np.uint8).reshape(30, 8, 8, 1)
  real_labels = np.arange(30, dtype=np.int32) % 10
  is_gen, index = generated.batch_plan(30, len(gen), 32, 0.5, 0, 5)
  parts = []
  for p in range(4):  # parallel.process_slice for process p of 4
    rows = slice(p * 8, (p + 1) * 8)
    requested.clear()
    parts.append(generated.load_rows(real_images, real_labels, gen, is_gen[rows], index[rows]))
    np.testing.assert_array_equal(np.concatenate(requested), index[rows][is_gen[rows]])
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  whole = generated.load_rows(real_images, real_labels, gen, is_gen, index)
  np.testing.assert_array_equal(images, whole[0])
  np.testing.assert_array_equal(labels, whole[1])
  np.testing.assert_array_equal(labels[is_gen], gen.labels[index[is_gen]])
  np.testing.assert_array_equal(images[~is_gen], real_images[index[~is_gen]])


def test_a_mixed_run_trains_and_resumed_batches_are_the_same(tiny_config, tmp_path):
  _archive(tmp_path / 'g1.npz', 300, seed=5)
  _archive(tmp_path / 'g2.npz', 200, seed=6)
  c = tiny_config
  c.method, c.batch_size, c.num_epochs = 'natural', 200, 1
  c.data.generated_path, c.data.generated_fraction = f'{tmp_path}/g*.npz', 0.75
  ds = datasets.load(c.data)
  mesh = parallel.make_mesh()
  full = [jax.device_get(b) for b in train.train_batches(ds, c, mesh, 0, 8, None, None)]
  resumed = [jax.device_get(b) for b in train.train_batches(ds, c, mesh, 5, 8, None, None)]
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  # 150 of 200 generated: those rows come from the archives (8x8 uniform noise, unlike digits'
  # 0-16 intensities scaled to 0-255).
  assert full[0]['images'].shape == (200, 8, 8, 1)
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(c, workdir)
  assert int(state.step) == -(-ds.num_train // 200)  # ceil(1437 / 200) = 8 steps an epoch
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['data']['generated_path'] == c.data.generated_path


def test_a_recipe_without_its_archive_stops_with_one_line(tiny_config):
  tiny_config.data.generated_required = True
  with pytest.raises(DatasetError, match='pass --config.data.generated_path=FILE.npz'):
    datasets.load(tiny_config.data)


def test_generated_data_is_refused_where_it_cannot_work(tiny_config, tmp_path):
  from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
  from ltd_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  tiny_config.data.generated_path = str(tmp_path / 'g.npz')
  tiny_config.data.generated_fraction = 1.0
  with pytest.raises(ConfigError, match='generated_fraction must lie in'):
    config_lib.validate(tiny_config)
  tiny_config.data.generated_fraction = 0.5
  tiny_config.teacher.cache_logits = True
  with pytest.raises(ConfigError, match='cache_logits'):
    config_lib.validate(tiny_config)


def test_the_leaderboard_recipe_trains_mixed_batches_with_an_ema_row_and_its_export(tmp_path):
  """``trades_cifar10_generated`` at CPU size (``:subset``) from the command line, pointed at a
  generated archive as the README says: mixed batches, the EMA in the table, its export."""
  from tests.conftest import run_in_process, shared_path  # pylint: disable=g-import-not-at-top
  cifar = os.path.dirname(shared_path('data', 'cifar-10-subset', 'cifar-10-batches-py'))
  _archive(tmp_path / '1m.npz', 600, shape=(32, 32, 3))
  workdir = tmp_path / 'run'
  common = ['--config=trades_cifar10_generated:subset', f'--workdir={workdir}',
            f'--config.data.generated_path={tmp_path}/1m.npz', f'--config.data.dir={cifar}']
  code = run_in_process(*common, '--config.max_steps=3', '--config.attack.steps=2',
                        '--config.ema.warmup_fraction=0.0', "--config.eval.final=('clean',)",
                        '--config.eval.final_subset_size=50', '--config.progress_bar=False')
  assert code == 0
  results = json.load(open(workdir / 'results.json'))
  assert results['trained_steps'] == 3 and results['ema']['checkpoint'] == 'latest:ema'
  assert '| clean (EMA) |' in open(workdir / 'results.md').read()
  environment = json.load(open(workdir / 'environment.json'))
  assert environment['git_commit']  # every run records its commit, versions and devices
  assert run_in_process(*common, '--mode=export', '--checkpoint=latest:ema') == 0
  info = json.load(open(workdir / 'export_ema' / 'model.json'))
  assert info['checkpoint'] == 'latest:ema'


def _write_npz(path, members: dict, version=None):
  """An uncompressed .npz written member by member (``np.lib.format`` version ``version``)."""
  import io  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    for name, array in members.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, array, version=version, allow_pickle=True)
      zf.writestr(f'{name}.npy', buf.getvalue())


def test_reader_layouts_and_every_message_in_full(tmp_path):
  """What the reader maps (C and Fortran order, .npy format 2.0, converted shards) and each
  refusal's whole line."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(12) % 10
  _write_npz(tmp_path / 'fortran.npz', {'image': np.asfortranarray(images), 'label': labels})
  _write_npz(tmp_path / 'v2.npz', {'image': images, 'label': labels}, version=(2, 0))
  _archive(tmp_path / 'packed.npz', 12, compressed=True, image=images, label=labels)
  for name in ('fortran', 'v2', 'packed'):
    gen = generated.load(_data_config(tmp_path / f'{name}.npz'), (8, 8, 1), 10)
    idx = np.array([11, 0, 5, 5])
    got = gen.images(idx)
    assert got.dtype == np.uint8 and gen.labels.dtype == np.int32, name
    np.testing.assert_array_equal(got, images[idx], err_msg=name)
    assert isinstance(gen.shards[0], np.memmap), name  # mapped, the converted one too
  rows = generated.load_rows(images, labels.astype(np.int32), gen, np.array([True, False]),
                             np.array([3, 4]))
  assert rows[0].dtype == np.uint8 and rows[1].dtype == np.int32
  assert generated.load(_data_config(''), (8, 8, 1), 10) is None
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert generated.load(ml_collections.ConfigDict({}), (8, 8, 1), 10) is None

  def message(spec):
    with pytest.raises(DatasetError) as e:
      generated.load(_data_config(spec), (8, 8, 1), 10)
    return str(e.value)

  _write_npz(tmp_path / 'v3.npz', {'image': images, 'label': labels}, version=(3, 0))
  assert message(tmp_path / 'v3.npz') == (
      f'{tmp_path}/v3.npz: image.npy is a .npy of format (3, 0), which this reader does not '
      f'map: rewrite the archive with np.savez')
  _write_npz(tmp_path / 'objects.npz', {'image': np.array([None] * 3, object), 'label': labels})
  assert message(tmp_path / 'objects.npz') == (
      f'{tmp_path}/objects.npz: image.npy holds Python objects, not numbers')
  _write_npz(tmp_path / 'column.npz', {'image': images, 'label': labels[:, None]})
  assert message(tmp_path / 'column.npz') == (
      f'{tmp_path}/column.npz: label must be an integer vector, got int64 [12, 1]')
  _write_npz(tmp_path / 'floats.npz', {'image': images, 'label': labels.astype(np.float32)})
  assert message(tmp_path / 'floats.npz') == (
      f'{tmp_path}/floats.npz: label must be an integer vector, got float32 [12]')
  _write_npz(tmp_path / 'other.npz', {'x': images, 'y': labels})
  assert message(tmp_path / 'other.npz') == (
      f"{tmp_path}/other.npz has no image or label array (it holds ['x', 'y']): a "
      f'generated-image archive holds uint8 image [N, H, W, C] and integer label [N]')
  damaged = tmp_path / 'damaged.npz'
  _write_npz(damaged, {'image': images, 'label': labels})
  import zipfile  # pylint: disable=g-import-not-at-top
  offset = zipfile.ZipFile(damaged).getinfo('image.npy').header_offset
  raw = bytearray(damaged.read_bytes())
  raw[offset:offset + 4] = b'JUNK'
  damaged.write_bytes(bytes(raw))
  assert message(damaged) == (f'{damaged}: image.npy has no zip header where the directory '
                              f'says: the archive is damaged; download it again')
  assert message(' , ') == ' hold no images'
  assert message(f'{tmp_path}/nothing*.npz') == (
      f'data.generated_path: no file matches {tmp_path}/nothing*.npz: check the pattern')
  assert message(f'{tmp_path}/X.npz') == (  # an X is no glob character
      f'generated-image shard {tmp_path}/X.npz not found: download it or fix '
      f'--config.data.generated_path')
  # Two globs: both their matches, in order.
  assert generated.shard_paths(f'{tmp_path}/fortran*.npz,{tmp_path}/v2*.npz') == [
      str(tmp_path / 'fortran.npz'), str(tmp_path / 'v2.npz')]


def test_every_generated_image_can_be_drawn():
  seen = np.concatenate([generated.batch_plan(5, 3, 8, 0.5, 0, s)[1][
      generated.batch_plan(5, 3, 8, 0.5, 0, s)[0]] for s in range(20)])
  assert set(seen.tolist()) == {0, 1, 2}


def test_shards_without_images_are_named_in_one_line(tmp_path):
  for name in ('a', 'b'):
    _archive(tmp_path / f'{name}.npz', 0)
  with pytest.raises(DatasetError) as e:
    generated.load(_data_config(f'{tmp_path}/a.npz,{tmp_path}/b.npz'), (8, 8, 1), 10)
  assert str(e.value) == f'{tmp_path}/a.npz, {tmp_path}/b.npz hold no images'
