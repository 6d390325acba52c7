"""Datasets fetched on first use: an official archive downloaded, verified and unpacked once.

``ensure(archive, root, ...)`` returns ``root/archive.folder``, fetching it when it is absent:

* the archive streams into ``FILE.partial`` (a progress bar on a terminal); a rerun after a cut
  connection resumes it with an HTTP range request (or restarts where the server ignores it);
* its checksum (``md5:HEX`` or ``sha256:HEX``) is verified before it is renamed to ``FILE``; a
  mismatch deletes it;
* it is unpacked into a temporary folder beside the target and renamed into place, so that the
  folder exists only when complete (the loaders look for the folder);
* with several processes, process 0 downloads and the others wait for the folder (or for the
  failure process 0 records in ``FILE.failed``);
* offline, one line names the URL, the file and where to put it.

An archive already at ``root/FILE`` (copied by hand) is verified and unpacked without a download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

from ltd_jax.errors import DatasetError

CHUNK = 1 << 20
DEFAULT_ROOT = os.path.join('~', '.cache', 'ltd_jax')


@dataclasses.dataclass(frozen=True)
class Archive:
  """An official archive: where it is published, its checksum (``md5:HEX`` / ``sha256:HEX``)
  and the folder it unpacks to."""
  url: str
  checksum: str
  folder: str

  @property
  def filename(self) -> str:
    return os.path.basename(self.url.split('?')[0]) or self.folder + '.archive'


def parse_checksum(checksum: str) -> tuple[str, str]:
  """``'md5:HEX'`` -> ``('md5', 'hex')``; anything else is a DatasetError naming the form."""
  kind, _, digest = checksum.partition(':')
  lengths = {'md5': 32, 'sha256': 64}
  digest = digest.lower()
  if kind not in lengths or len(digest) != lengths[kind] or any(
      c not in '0123456789abcdef' for c in digest):
    raise DatasetError(f'checksum {checksum!r} must be md5:<32 hex digits> or '
                       f'sha256:<64 hex digits>')
  return kind, digest


def file_digest(path: str, kind: str) -> str:
  h = hashlib.new(kind)
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(CHUNK), b''):
      h.update(chunk)
  return h.hexdigest()


def default_root() -> str:
  return os.path.expanduser(DEFAULT_ROOT)


def _offline_message(name: str, archive: Archive, root: str, reason: str) -> str:
  return (f'cannot download {name} from {archive.url} ({reason}): fetch {archive.filename} '
          f'yourself and put it in {root} (or unpack it there as {archive.folder}/), or point '
          f'--config.data.url at a reachable copy')


def _fetch(archive: Archive, partial: str, name: str, root: str, timeout_s: float) -> None:
  """Streams ``archive.url`` into ``partial``, resuming it if it holds a prefix."""
  have = os.path.getsize(partial) if os.path.exists(partial) else 0
  request = urllib.request.Request(archive.url, headers={'User-Agent': 'ltd_jax'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  try:
    response = urllib.request.urlopen(request, timeout=timeout_s)  # pylint: disable=consider-using-with
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # the prefix is already the whole file
      return
    raise DatasetError(_offline_message(name, archive, root, f'HTTP {e.code}')) from e
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, 'reason', e)
    raise DatasetError(_offline_message(name, archive, root, str(reason))) from e
  with response:
    resumed = response.status == 206
    length = response.headers.get('Content-Length')
    total = (int(length) + (have if resumed else 0)) if length else None
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=have if resumed else 0, unit='B', unit_scale=True,
               desc=f'{name}: {archive.filename}', disable=None, file=sys.stderr)
    try:
      with open(partial, 'ab' if resumed else 'wb') as f:
        while True:
          chunk = response.read(CHUNK)
          if not chunk:
            break
          f.write(chunk)
          bar.update(len(chunk))
    except (OSError, ConnectionError) as e:  # a cut connection: the prefix stays for a rerun
      raise DatasetError(f'download of {name} from {archive.url} broke off ({e}); rerun the '
                         f'same command to resume it') from e
    finally:
      bar.close()
  size = os.path.getsize(partial)
  if total is not None and size < total:
    raise DatasetError(f'download of {name} from {archive.url} broke off at {size} of {total} '
                       f'bytes; rerun the same command to resume it')


def _unpack(path: str, target: str) -> None:
  """Unpacks ``path`` so that ``target`` appears at once, complete, or not at all."""
  parent, folder = os.path.dirname(target), os.path.basename(target)
  staging = tempfile.mkdtemp(prefix=f'.{folder}.unpacking-', dir=parent)
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        z.extractall(staging)
    else:
      with tarfile.open(path) as t:
        t.extractall(staging, filter='data')
    unpacked = os.path.join(staging, folder)
    if not os.path.isdir(unpacked):
      raise DatasetError(f'{path} holds no folder {folder}/ (it holds '
                         f'{", ".join(sorted(os.listdir(staging))) or "nothing"}): check '
                         f'--config.data.url')
    os.rename(unpacked, target)
  except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
    raise DatasetError(f'{path} is not a readable archive ({e}): delete it and rerun') from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _download_and_unpack(name: str, archive: Archive, root: str, timeout_s: float) -> None:
  kind, digest = parse_checksum(archive.checksum)
  path = os.path.join(root, archive.filename)
  if not os.path.exists(path):
    partial = path + '.partial'
    _fetch(archive, partial, name, root, timeout_s)
    got = file_digest(partial, kind)
    if got != digest:
      os.remove(partial)
      raise DatasetError(f'{archive.filename} from {archive.url} has {kind} {got}, expected '
                         f'{digest}: deleted; check --config.data.url / data.checksum and rerun')
    os.replace(partial, path)
  else:
    got = file_digest(path, kind)
    if got != digest:
      raise DatasetError(f'{path} has {kind} {got}, expected {digest}: delete it (or fix '
                         f'--config.data.checksum) and rerun')
  _unpack(path, os.path.join(root, archive.folder))


def ensure(name: str, archive: Archive, root: str, *, process_index: int = 0,
           process_count: int = 1, wait_s: float = 6 * 3600, timeout_s: float = 60) -> str:
  """``root/archive.folder``, downloaded, verified and unpacked if it is absent (process 0
  only; other processes wait up to ``wait_s`` for it). ``root`` must be a folder every process
  sees (a shared file system), as ``data.dir`` is for multi-host runs."""
  root = os.path.abspath(os.path.expanduser(root))
  target = os.path.join(root, archive.folder)
  if os.path.isdir(target):
    return target
  parse_checksum(archive.checksum)
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise DatasetError(f'cannot create {root} for {name} ({e}): pass a writable '
                       f'--config.data.dir') from e
  failed = os.path.join(root, archive.filename + '.failed')
  if process_index == 0:
    if os.path.exists(failed):
      os.remove(failed)
    try:
      _download_and_unpack(name, archive, root, timeout_s)
    except DatasetError as e:
      if process_count > 1:  # tells the waiting processes
        with open(failed, 'w') as f:
          f.write(str(e))
      raise
    return target
  start = time.time()
  while not os.path.isdir(target):
    if os.path.exists(failed) and os.path.getmtime(failed) >= start - 1:
      with open(failed) as f:
        raise DatasetError(f'process 0 could not fetch {name}: {f.read().strip()}')
    if time.time() - start > wait_s:
      raise DatasetError(f'waited {wait_s:.0f} s for process 0 to fetch {name} into {target}; '
                         f'fetch it there by hand and rerun')
    time.sleep(0.5)
  return target
