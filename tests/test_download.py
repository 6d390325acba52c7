"""Datasets on first use (ltd_jax/download.py) against a local HTTP server on 127.0.0.1 that
serves a small CIFAR-10 archive in the official layout, built here: checksum verified, a
mismatch refused, a connection cut mid-file resumed, no server at all, two processes of one run."""

import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading

import numpy as np
import pytest

from ltd_jax import config_lib
from ltd_jax import datasets
from ltd_jax import download
from ltd_jax.errors import DatasetError
from tests.conftest import ROOT

LABEL_NAMES = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse',
               b'ship', b'truck']


def cifar10_archive(rng, train=20, test=10) -> tuple[bytes, np.ndarray, np.ndarray]:
  """A cifar-10-python.tar.gz of the official layout: rows of 3072 channel-major uint8 values."""
  rows = rng.integers(0, 256, size=(train + test, 3072), dtype=np.uint8)
  labels = rng.integers(0, 10, size=train + test)
  members = {
      'data_batch_1': {b'data': rows[:train], b'labels': labels[:train].tolist()},
      'test_batch': {b'data': rows[train:], b'labels': labels[train:].tolist()},
      'batches.meta': {b'label_names': LABEL_NAMES},
  }
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz') as tar:
    for name, content in members.items():
      payload = pickle.dumps(content)
      info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return buf.getvalue(), rows, labels


class ArchiveServer:
  """Serves ``payload`` at /cifar-10-python.tar.gz with HTTP range support; ``cut_after`` bytes
  into the first full response the connection is closed (a Content-Length promising more)."""

  def __init__(self, payload: bytes, cut_after: int | None = None):
    self.payload, self.cut_after, self.requests = payload, cut_after, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        server.requests.append((self.path, self.headers.get('Range')))
        if self.path != '/cifar-10-python.tar.gz':
          self.send_error(404)
          return
        start = 0
        if self.headers.get('Range'):
          start = int(self.headers['Range'].split('=')[1].split('-')[0])
          self.send_response(206)
          self.send_header('Content-Range', f'bytes {start}-{len(server.payload) - 1}/'
                                            f'{len(server.payload)}')
        else:
          self.send_response(200)
        body = server.payload[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if server.cut_after is not None and start == 0:
          self.wfile.write(body[:server.cut_after])
          server.cut_after = None
          self.wfile.flush()
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def data_config(root, url, payload, **kw):
  c = config_lib.default_config().data
  c.name, c.dir, c.url = 'cifar10', str(root), url
  c.checksum = 'md5:' + hashlib.md5(payload).hexdigest()
  for k, v in kw.items():
    c[k] = v
  return c


def expected_images(rows):
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def looks_complete(root) -> bool:
  return (os.path.isdir(root / 'cifar-10-batches-py')
          or os.path.exists(root / 'cifar-10-python.tar.gz'))


def test_download_verifies_unpacks_and_is_read_once(tmp_path):
  payload, rows, labels = cifar10_archive(np.random.default_rng(0))
  with ArchiveServer(payload) as server:
    ds = datasets.load(data_config(tmp_path, server.url, payload))
    np.testing.assert_array_equal(ds.train_images, expected_images(rows[:20]))
    np.testing.assert_array_equal(ds.test_labels, labels[20:])
    assert ds.class_names[1] == 'automobile'
    assert len(server.requests) == 1
    datasets.load(data_config(tmp_path, server.url, payload))  # present: no second request
    assert len(server.requests) == 1
  assert sorted(os.listdir(tmp_path)) == ['cifar-10-batches-py', 'cifar-10-python.tar.gz']


def test_a_checksum_mismatch_is_refused_and_leaves_nothing_complete(tmp_path):
  payload, _, _ = cifar10_archive(np.random.default_rng(1))
  with ArchiveServer(payload) as server:
    config = data_config(tmp_path, server.url, payload)
    config.checksum = 'sha256:' + hashlib.sha256(b'another file').hexdigest()
    with pytest.raises(DatasetError, match=r'has sha256 [0-9a-f]{64}, expected .*deleted'):
      datasets.load(config)
  assert not looks_complete(tmp_path) and not os.listdir(tmp_path)
  # The right sha256 is accepted as well as the md5.
  with ArchiveServer(payload) as server:
    config = data_config(tmp_path, server.url, payload)
    config.checksum = 'sha256:' + hashlib.sha256(payload).hexdigest()
    assert datasets.load(config).train_images.shape == (20, 32, 32, 3)


def test_a_cut_connection_is_resumed_by_the_rerun(tmp_path):
  payload, rows, _ = cifar10_archive(np.random.default_rng(2))
  cut = len(payload) // 3
  with ArchiveServer(payload, cut_after=cut) as server:
    config = data_config(tmp_path, server.url, payload)
    with pytest.raises(DatasetError, match='broke off.*rerun the same command to resume'):
      datasets.load(config)
    assert not looks_complete(tmp_path)
    assert os.path.getsize(tmp_path / 'cifar-10-python.tar.gz.partial') == cut
    ds = datasets.load(config)
    assert server.requests[-1] == ('/cifar-10-python.tar.gz', f'bytes={cut}-')
  np.testing.assert_array_equal(ds.train_images, expected_images(rows[:20]))


def test_an_archive_put_there_by_hand_is_verified_and_unpacked(tmp_path):
  payload, _, _ = cifar10_archive(np.random.default_rng(3))
  (tmp_path / 'cifar-10-python.tar.gz').write_bytes(payload)
  config = data_config(tmp_path, 'http://127.0.0.1:9/cifar-10-python.tar.gz', payload)
  assert datasets.load(config).test_images.shape == (10, 32, 32, 3)
  (tmp_path / 'other').mkdir()
  data = bytearray(payload)
  data[100] ^= 1  # one bit off
  (tmp_path / 'other' / 'cifar-10-python.tar.gz').write_bytes(bytes(data))
  config.dir = str(tmp_path / 'other')
  with pytest.raises(DatasetError, match='has md5 .* delete it'):
    datasets.load(config)


def test_no_server_gives_one_line_naming_url_file_and_folder(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}/cifar-10-python.tar.gz'
  config = data_config(tmp_path / 'cache', url, b'')
  with pytest.raises(DatasetError) as e:
    datasets.load(config)
  line = str(e.value)
  assert '\n' not in line and url in line and 'cifar-10-python.tar.gz' in line
  assert str(tmp_path / 'cache') in line and 'refused' in line.lower()
  config.download = False
  with pytest.raises(DatasetError, match='cifar10 not found'):
    datasets.load(config)


def test_the_command_line_exits_2_without_a_server(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'run.py', '--config=trades_cifar10', f'--workdir={tmp_path / "w"}',
       f'--config.data.dir={tmp_path / "d"}', '--config.data.url=http://127.0.0.1:9/c.tar.gz'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'cannot download cifar10 from http://127.0.0.1:9/c.tar.gz' in lines[0]


WORKER = textwrap.dedent('''
    import json, sys
    import jax
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from ltd_jax import config_lib, datasets
    c = config_lib.default_config().data
    c.name, c.dir, c.url, c.checksum = 'cifar10', sys.argv[3], sys.argv[4], sys.argv[5]
    ds = datasets.load(c)
    print(json.dumps([jax.process_index(), int(ds.train_images.sum())]))
''')


def test_two_processes_of_one_run_download_once(tmp_path):
  payload, rows, _ = cifar10_archive(np.random.default_rng(4))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    coordinator = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  with ArchiveServer(payload) as server:
    checksum = 'md5:' + hashlib.md5(payload).hexdigest()
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, coordinator, str(i), str(tmp_path),
                               server.url, checksum], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len(server.requests) == 1  # process 0 only
  sums = {tuple(map(int, o[0].strip().splitlines()[-1].strip('[]').split(','))) for o in outs}
  assert sums == {(0, int(rows[:20].sum())), (1, int(rows[:20].sum()))}


def test_process_1_reports_the_failure_of_process_0(tmp_path):
  archive = download.Archive('http://127.0.0.1:9/cifar-10-python.tar.gz',
                             'md5:' + '0' * 32, 'cifar-10-batches-py')
  with pytest.raises(DatasetError):
    download.ensure('cifar10', archive, str(tmp_path), process_index=0, process_count=2)
  os.utime(tmp_path / 'cifar-10-python.tar.gz.failed')
  with pytest.raises(DatasetError, match='process 0 could not fetch cifar10: cannot download'):
    download.ensure('cifar10', archive, str(tmp_path), process_index=1, process_count=2,
                    wait_s=30)


def test_checksums_are_parsed_strictly():
  assert download.parse_checksum('md5:' + 'A' * 32) == ('md5', 'a' * 32)
  assert download.parse_checksum('sha256:' + 'ab' * 32) == ('sha256', 'ab' * 32)
  for bad in ('md5:' + 'a' * 31, 'sha1:' + 'a' * 40, 'a' * 32, 'md5:' + 'g' * 32):
    with pytest.raises(DatasetError, match='must be md5:<32 hex digits> or sha256'):
      download.parse_checksum(bad)


def test_the_registry_names_the_published_archives():
  assert datasets.get('cifar10').archive.checksum == 'md5:c58f30108f718f92721af3b95e74349a'
  assert datasets.get('cifar100').archive.checksum == 'md5:eb9058c3a382ffc7106e4002c42a8d85'
  assert datasets.get('cifar100').archive.folder == 'cifar-100-python'
  assert datasets.get('tiny_imagenet').archive.url.endswith('tiny-imagenet-200.zip')
  assert datasets.get('imagenet').archive is None


def test_a_zip_archive_from_a_file_url_unpacks_its_folder(tmp_path):
  import zipfile  # pylint: disable=g-import-not-at-top
  archive_path = tmp_path / 'tiny-imagenet-200.zip'
  with zipfile.ZipFile(archive_path, 'w') as z:
    z.writestr('tiny-imagenet-200/wnids.txt', 'n01443537\n')
  digest = hashlib.sha256(archive_path.read_bytes()).hexdigest()
  archive = download.Archive(archive_path.as_uri(), 'sha256:' + digest, 'tiny-imagenet-200')
  target = download.ensure('tiny_imagenet', archive, str(tmp_path / 'cache'))
  assert open(os.path.join(target, 'wnids.txt')).read() == 'n01443537\n'
  wrong = download.Archive(archive_path.as_uri(), 'sha256:' + digest, 'not-in-it')
  with pytest.raises(DatasetError, match='holds no folder not-in-it/'):
    download.ensure('tiny_imagenet', wrong, str(tmp_path / 'cache2'))
  assert not os.path.exists(tmp_path / 'cache2' / 'not-in-it')


def test_a_cifar10_config_downloads_verifies_and_trains(tmp_path):
  """The issue's "done": a paper config pointed at a reachable archive fetches, checks and trains."""
  from tests.conftest import run_in_process  # pylint: disable=g-import-not-at-top
  payload, _, _ = cifar10_archive(np.random.default_rng(5), train=40, test=20)
  with ArchiveServer(payload) as server:
    code = run_in_process(
        '--config=trades_cifar10:subset', f'--workdir={tmp_path / "run"}',
        f'--config.data.dir={tmp_path / "data"}', f'--config.data.url={server.url}',
        '--config.data.checksum=md5:' + hashlib.md5(payload).hexdigest(),
        '--config.batch_size=10', '--config.max_steps=2', '--config.model.width=4',
        '--config.attack.steps=1', '--config.eval.pgd_steps=1', '--config.eval.cw_steps=1',
        '--config.eval.final_subset_size=10', '--config.progress_bar=False')
    assert code == 0 and len(server.requests) == 1
  import json  # pylint: disable=g-import-not-at-top
  results = json.load(open(tmp_path / 'run' / 'results.json'))
  assert results['title'].startswith('trades / small_cnn / cifar10')
  assert os.path.isdir(tmp_path / 'data' / 'cifar-10-batches-py')
