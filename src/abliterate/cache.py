"""The one caching layer: content keys, atomic writes, checksummed disk entries, and locks.

Every disk cache (activations, the unedited model's evaluation, the embedded refuser build) goes
through :class:`DiskCache`, and every file a trial writes goes through :func:`atomic_path`:

- **Keys**: :func:`content_key`, a sha256 of the parts that decide an entry plus the results
  version and the numeric libraries (:func:`abliterate.provenance.cache_key`), truncated to
  :data:`KEY_CHARS` for every cache.
- **Atomic writes**: a file or directory is written under a staging name beside its target,
  ``.<name>.<host>.<pid>.tmp`` (unique per host and process, so jobs on several nodes sharing a
  cache never write the same staging file), fsynced, renamed over the target, and the directory
  is fsynced; on any failure the staging is removed and the error names the target in one line
  (``could not write <path>: <reason>``, which ``run.py`` prints as its ``error:`` line for a full
  disk). Staging left by a process that died (a dead pid on this host, or anything older than
  :data:`STALE_STAGING_S`) is swept when a cache directory is opened.
- **Entries with checksums**: an entry is a directory ``<cache>/<kind>/<key>/`` holding its
  payload files and a manifest (``.manifest.json``: each file's size and sha256). Reading an
  entry verifies the manifest first; a mismatch logs one WARNING naming the entry and the entry is
  rebuilt. The manifest's name starts with a dot, so it is not part of a model folder's content
  signature (:func:`abliterate.provenance.folder_signature`).
- **Locks**: :func:`file_lock`, an flock (``filelock.FileLock``) with a timeout, and a holder file
  beside the lock naming the host, pid and start time of whoever holds it. A waiter logs one INFO
  line naming the lock and its holder, raises :class:`LockTimeout` naming both at the timeout,
  and ends the wait early when the holder is a dead process on this host. A dead holder on another
  host cannot be told from a slow one: the timeout bounds that wait.
  :func:`check_lock_support` checks once per process that ``paths.cache_dir`` supports the locks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO, TypeVar

from filelock import FileLock, Timeout

from abliterate.config import ConfigError
from abliterate.provenance import cache_key

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_CHARS = 20  # hex characters of every cache key (80 bits)
MANIFEST = ".manifest.json"
MANIFEST_FORMAT = 1
STALE_STAGING_S = 24 * 3600.0  # staging older than this is swept whatever its host
DEFAULT_LOCK_TIMEOUT_S = 1800.0
LOCK_TIMEOUT_ENV = "ABLITERATE_LOCK_TIMEOUT"
HOST = platform.node()

_configured_lock_timeout_s: float | None = None


# ---------------------------------------------------------------------------------------------
# Keys


def content_key(parts: Mapping[str, Any]) -> str:
    """The key of a cache entry: everything in ``parts`` plus the results version, torch and
    transformers (an entry made by other code or other numerics is never reused)."""
    return cache_key(parts, KEY_CHARS)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic writes


def staging_path(path: Path) -> Path:
    """``.<name>.<host>.<pid>.tmp`` beside ``path``: unique per host and process."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # some file systems cannot fsync a directory; the files themselves are synced
        if not directory or error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                _fsync(child)
        _fsync(path, directory=True)
    else:
        _fsync(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_error(path: Path, error: OSError) -> OSError:
    """The one error of a failed write: names the target; ``errno`` is kept (run.py turns a full
    disk into one ``error:`` line)."""
    reason = error.strerror or str(error)
    if str(path) in reason:  # already said by an inner write
        return error
    return OSError(
        error.errno,
        f"could not write {path}: {reason}; its previous content (if any) is unchanged",
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a staging path beside ``path``; write a file or a directory there.

    On a normal exit the staging is fsynced, renamed over ``path`` (a directory that exists is
    moved aside first) and the parent directory fsynced: a reader sees the old content or the
    whole new one. On any exception the staging is removed; an ``OSError`` is re-raised as
    :func:`write_error` naming ``path``.
    """
    path = Path(path)
    staging = staging_path(path)
    _remove(staging)
    try:
        yield staging
        _fsync_tree(staging)
        if staging.is_dir() and path.is_dir():
            aside = path.with_name(f".{path.name}.old.{HOST}.{os.getpid()}.tmp")
            _remove(aside)
            os.replace(path, aside)
            os.replace(staging, path)
            _remove(aside)
        else:
            os.replace(staging, path)
        _fsync(path.parent, directory=True)
    except BaseException as error:
        _remove(staging)
        if isinstance(error, OSError) and _is_write_error(error, path, staging):
            raise write_error(path, error) from error
        raise


def _is_write_error(error: OSError, path: Path, staging: Path) -> bool:
    """An error of writing ``path`` (a write to an open handle names no file), not one of the
    computation that ran inside the block (reading a model file, say)."""
    if isinstance(error, TimeoutError):
        return False
    name = error.filename
    return name is None or str(name).startswith((str(staging), str(path)))


def write_text_atomic(path: str | Path, write: Callable[[TextIO], None]) -> None:
    """Write a text file through :func:`atomic_path`; ``write`` gets the open handle."""
    with atomic_path(path) as staging, staging.open("w") as handle:
        write(handle)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as staging:
        staging.write_bytes(data)


def save_safetensors_atomic(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """safetensors written through :func:`atomic_path` (fsynced, one-line error on a full disk).

    The file is serialised in memory and written by Python, not by ``safetensors.save_file``,
    which writes its own unsynced temporary file and reports a full disk as a ``SafetensorError``.
    """
    from safetensors.torch import save

    write_bytes_atomic(path, save(tensors, metadata))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


_STAGING = re.compile(r"^\.(?P<rest>.+)\.(?P<pid>\d+)\.tmp$")
# staging names of earlier versions: name.tmp-<pid>, .name.tmp-<pid>, .name.partial, name.stale-<pid>
_LEGACY_STAGING = re.compile(r"(\.tmp-\d+|\.partial|\.stale-\d+)$")


def is_stale_staging(path: Path, now: float | None = None) -> bool:
    """A staging file or directory left behind: a dead pid on this host, or older than a day."""
    name = path.name
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    match = _STAGING.match(name)
    if match:
        if match["rest"].endswith(f".{HOST}") and not _pid_alive(int(match["pid"])):
            return True
        return age > STALE_STAGING_S
    return bool(_LEGACY_STAGING.search(name)) and age > STALE_STAGING_S


def sweep_staging(directory: Path) -> list[Path]:
    """Remove the stale staging in ``directory`` (not recursive); returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if is_stale_staging(path):
                _remove(path)
                removed.append(path)
    if removed:
        log.info(
            "removed %d stale staging file(s) in %s: %s",
            len(removed),
            directory,
            ", ".join(p.name for p in removed),
        )
    return removed


# ---------------------------------------------------------------------------------------------
# Locks


class LockTimeout(TimeoutError):
    """A cache lock was not acquired within its timeout."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, from the holder file beside it."""

    host: str
    pid: int
    since: float  # epoch seconds
    what: str = ""

    def describe(self) -> str:
        stamp = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.host}:{self.pid} since {stamp}"

    def dead_here(self) -> bool:
        """True when the holder is a process on this host that no longer exists."""
        return self.host == HOST and not _pid_alive(self.pid)


def holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(f"{lock_path.name}.holder")


def read_holder(lock_path: Path) -> Holder | None:
    try:
        record = json.loads(holder_path(lock_path).read_text())
        return Holder(
            str(record["host"]), int(record["pid"]), float(record["since"]), record.get("what", "")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_holder(lock_path: Path, holder: Holder) -> None:
    # advisory (who to blame while waiting): atomic, not fsynced
    path = holder_path(lock_path)
    staging = staging_path(path)
    try:
        staging.write_text(json.dumps(holder.__dict__))
        os.replace(staging, path)
    except OSError as error:
        _remove(staging)
        log.debug("could not write the lock holder file %s: %s", path, error)


def configure_lock_timeout(seconds: float | None) -> None:
    """Set the process's default lock timeout (``paths.lock_timeout_s``); None: the default.

    Raises:
        ConfigError: not a finite number >= 0.
    """
    global _configured_lock_timeout_s
    if seconds is not None and not (
        isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0
    ):
        raise ConfigError(
            f"paths.lock_timeout_s={seconds!r} must be a finite number of seconds >= 0 or null "
            f"(${LOCK_TIMEOUT_ENV}, else {DEFAULT_LOCK_TIMEOUT_S:g})"
        )
    _configured_lock_timeout_s = None if seconds is None else float(seconds)


def configure(paths: Any) -> None:
    """Apply a trial's ``paths`` config: its lock timeout, and the check that its cache directory
    supports locks (once per process), before any model loads."""
    configure_lock_timeout(getattr(paths, "lock_timeout_s", None))
    check_lock_support(paths.cache_dir)


def default_lock_timeout() -> float:
    """``paths.lock_timeout_s`` when configured, else ``$ABLITERATE_LOCK_TIMEOUT``, else 30 min."""
    if _configured_lock_timeout_s is not None:
        return _configured_lock_timeout_s
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(
                f"${LOCK_TIMEOUT_ENV}={value!r} must be a finite number of seconds >= 0"
            )
        return seconds
    return DEFAULT_LOCK_TIMEOUT_S


def _break_dead_lock(lock_path: Path, dead: Holder) -> bool:
    """Remove a lock file whose recorded holder is a dead process on this host.

    flock frees the lock of a process that exits, so a lock still held under a dead holder's
    record is held by a descriptor that outlived it (a child that inherited it). Breaking is
    serialised by a second lock and done only while the holder file still names the same dead
    process: a new holder writes its own record right after acquiring, and whoever breaks removes
    the dead record, so two waiters never both break and take the lock.
    """
    with FileLock(str(lock_path.with_name(f"{lock_path.name}.break")), fallback_to_soft=False):
        if read_holder(lock_path) != dead:
            return False
        log.warning(
            "breaking lock %s: its holder %s is no longer running", lock_path, dead.describe()
        )
        with contextlib.suppress(OSError):
            lock_path.unlink()
        with contextlib.suppress(OSError):
            holder_path(lock_path).unlink()
        return True


@contextlib.contextmanager
def file_lock(
    path: str | Path, *, timeout_s: float | None = None, what: str = ""
) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the lock file.
        timeout_s: seconds to wait; None: :func:`default_lock_timeout`. 0 tries once.
        what: what the lock protects, recorded in the holder file.

    Raises:
        LockTimeout: not acquired in time; the message names the lock file and its holder.
    """
    path = Path(path)
    timeout = default_lock_timeout() if timeout_s is None else float(timeout_s)
    lock = FileLock(str(path), fallback_to_soft=False)
    poll = min(2.0, max(0.05, timeout / 20))
    deadline = time.monotonic() + timeout
    waiting_logged = False
    dead_seen: Holder | None = None
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(poll, deadline - time.monotonic())))
            break
        except Timeout:
            holder = read_holder(path)
            who = holder.describe() if holder else "an unknown holder (no holder file)"
            if not waiting_logged and timeout > 0:  # timeout 0 asks, it does not wait
                log.info("waiting for %s held by %s", path, who)
                waiting_logged = True
            if holder is not None and holder.dead_here():
                # seen dead twice in a row: not a record being replaced by a new holder
                if dead_seen == holder and _break_dead_lock(path, holder):
                    dead_seen = None
                    continue
                dead_seen = holder
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"timed out after {timeout:g} s waiting for lock {path}, held by {who}; if "
                    "that holder is gone, remove the lock file (set the wait with "
                    f"paths.lock_timeout_s or ${LOCK_TIMEOUT_ENV})"
                ) from None
    holder = Holder(HOST, os.getpid(), time.time(), what)
    _write_holder(path, holder)
    try:
        yield path
    finally:
        if read_holder(path) == holder:
            with contextlib.suppress(OSError):
                holder_path(path).unlink()
        lock.release()


_PROBE_SCRIPT = """
import sys
from filelock import FileLock, Timeout
try:
    FileLock(sys.argv[1], fallback_to_soft=False).acquire(timeout=0)
except Timeout:
    sys.exit(0)
except Exception as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(2)
sys.exit(3)
"""


@functools.cache
def _check_lock_support(root: Path) -> None:
    def fail(why: str) -> ConfigError:
        return ConfigError(
            f"paths.cache_dir={str(root)!r} does not support the file locks its caches rely on "
            f"({why}); set paths.cache_dir (or $ABLITERATE_CACHE) to a directory on a file "
            "system with working flock"
        )

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fail(f"cannot create it: {error.strerror or error}") from None
    probe = root / f".lock-probe.{HOST}.{os.getpid()}.lock"
    try:
        with FileLock(str(probe), fallback_to_soft=False, timeout=5):
            done = subprocess.run(
                [sys.executable, "-c", _PROBE_SCRIPT, str(probe)],
                capture_output=True,
                text=True,
                timeout=120,
            )
    except (OSError, Timeout, NotImplementedError) as error:
        raise fail(f"locking failed: {error}") from None
    except subprocess.TimeoutExpired:
        raise fail("a second process's lock attempt hung") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if done.returncode == 3:
        raise fail("a second process acquired a lock this process held")
    if done.returncode != 0:
        raise fail(f"a second process could not lock: {done.stderr.strip()[-200:]}")


def check_lock_support(cache_dir: str | Path) -> None:
    """Check, once per process and cache directory, that locks there exclude other processes.

    This process takes a lock and a second process must fail to take it.

    Raises:
        ConfigError: one line naming ``paths.cache_dir``, when they do not.
    """
    _check_lock_support(Path(cache_dir).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# Checksummed entries


def write_manifest(directory: Path, adopted: bool = False) -> dict[str, Any]:
    """Record every payload file's size and sha256 in ``directory/.manifest.json``."""
    files = {
        str(path.relative_to(directory)): {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": HOST,
        # adopted: made by a version without manifests; its files were checksummed on first read
        "adopted": adopted,
    }
    # atomic: a process adopting an entry can race another one reading it
    write_text_atomic(directory / MANIFEST, lambda handle: json.dump(manifest, handle, indent=1))
    return manifest


def _stat_signature(directory: Path, names: list[str]) -> tuple[Any, ...]:
    stats = [(directory / name).stat() for name in [MANIFEST, *names]]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


# entries this process has verified, by path and the stat of their files: hashing a model's
# weights once per process is enough
_verified: dict[Path, tuple[Any, ...]] = {}


class ManifestMissing(Exception):
    """The entry has no manifest (it predates them)."""


def verify_entry(directory: Path) -> str | None:
    """None when every file in the entry's manifest is present with its size and sha256, else
    what is wrong (one phrase).

    Raises:
        ManifestMissing: the entry has no manifest.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ManifestMissing(str(directory)) from None
    except (OSError, ValueError) as error:
        return f"its manifest is unreadable ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    try:
        signature = _stat_signature(directory, list(files))
    except OSError as error:
        return f"a file is missing ({error.filename})"
    if _verified.get(directory) == signature:
        return None
    for name, expected in files.items():
        path = directory / name
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size} bytes, its manifest {expected.get('size')}"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} fails its sha256"
    _verified[directory] = signature
    return None


class DiskCache:
    """The entries of one kind under ``<cache_dir>/<kind>/``, each a directory ``<key>/``.

    Opening it checks that the cache supports locks (once per process) and sweeps stale staging.

    Args:
        cache_dir: the project cache (``paths.cache_dir``).
        kind: the subdirectory (``activations``, ``baseline_eval``, ``models``).
        adopt: accept an entry without a manifest (written by a version without them) when it
            loads, and write its manifest from the files present. Its files were never checksummed
            at write time, so this trusts them as the earlier version did, once.
    """

    def __init__(self, cache_dir: str | Path, kind: str, *, adopt: bool = False):
        cache_dir = Path(cache_dir).expanduser()
        check_lock_support(cache_dir)
        self.kind = kind
        self.root = cache_dir / kind
        self.adopt = adopt
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_staging(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def lock(
        self, key: str, timeout_s: float | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        return file_lock(self.root / f"{key}.lock", timeout_s=timeout_s, what=f"{self.kind}/{key}")

    def read(self, key: str, load: Callable[[Path], T], warn: bool = True) -> T | None:
        """The loaded entry, or None when it is missing, fails its checksum or does not load
        (one WARNING naming the entry, unless ``warn`` is False)."""
        directory = self.path(key)
        if not directory.is_dir():
            return None
        adopting = False
        try:
            problem = verify_entry(directory)
        except ManifestMissing:
            if not self.adopt:
                problem = "it has no manifest"
            else:
                problem, adopting = None, True
        if problem is None:
            try:
                value = load(directory)
            except Exception as error:  # a loader's own errors: the entry is unusable
                problem = f"it does not load ({type(error).__name__}: {error})"
        if problem is not None:
            if warn:
                log.warning("cache entry %s is damaged: %s; rebuilding it", directory, problem)
            return None
        if adopting:
            try:
                write_manifest(directory, adopted=True)
                log.info("cache entry %s predates checksums; recorded its files' sha256", directory)
            except OSError as error:
                log.warning("could not write the manifest of %s: %s", directory, error)
        return value

    def write(self, key: str, store: Callable[[Path], T]) -> T:
        """Build an entry: ``store(staging_dir)`` writes the payload files (and returns what the
        caller needs); the manifest is added and the entry replaces ``key`` atomically."""
        with atomic_path(self.path(key)) as staging:
            staging.mkdir(parents=True)
            value = store(staging)
            write_manifest(staging)
        return value

    def get_or_create(
        self, key: str, load: Callable[[Path], T], create: Callable[[Path], T]
    ) -> tuple[T, bool]:
        """``(value, hit)``: the entry when it reads back intact, else built by one process
        while concurrent ones wait on its lock and then read it."""
        value = self.read(key, load)
        if value is not None:
            return value, True
        with self.lock(key):
            value = self.read(key, load, warn=False)
            if value is not None:
                return value, True
            return self.write(key, create), False
