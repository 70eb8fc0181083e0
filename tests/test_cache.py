"""The caching layer: atomic writes, stale staging, checksummed entries, locks, lock support."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from abliterate import cache
from abliterate.config import ConfigError

# A process that takes the lock with a raw flock, records a holder, and keeps holding it.
HOLD_SCRIPT = textwrap.dedent(
    """
    import fcntl, json, os, sys, time
    lock_path, host, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    holder = {"host": host, "pid": os.getpid(), "since": time.time(), "what": "test"}
    with open(lock_path + ".holder", "w") as handle:
        json.dump(holder, handle)
    if mode == "orphan":
        child = os.fork()
        if child > 0:
            # the recorded holder exits; its child keeps the inherited descriptor (and the flock)
            print(child, flush=True)
            os._exit(0)
    else:
        print(os.getpid(), flush=True)
    time.sleep(120)
    """
)


def hold_lock(
    lock_path: Path, host: str = cache.HOST, mode: str = "hold"
) -> tuple[subprocess.Popen, int]:
    """Start a process holding ``lock_path``; returns it and the pid of the process holding the
    flock (in ``orphan`` mode a child of it) once the lock and its holder file exist."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(lock_path), host, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())  # printed once the lock is held


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=10)


def test_lock_is_exclusive_and_records_its_holder(tmp_path):
    lock_path = tmp_path / "entry.lock"
    with cache.file_lock(lock_path, timeout_s=5, what="an entry") as held:
        assert held == lock_path
        holder = cache.read_holder(lock_path)
        assert holder is not None
        assert (holder.host, holder.pid, holder.what) == (cache.HOST, os.getpid(), "an entry")
        assert abs(holder.since - time.time()) < 60
        probe = subprocess.run(
            [sys.executable, "-c", cache._PROBE_SCRIPT, str(lock_path)], timeout=60
        )
        assert probe.returncode == 0  # another process cannot take it
    assert not cache.holder_path(lock_path).exists()  # released: no holder left


def test_lock_timeout_names_the_lock_file_and_a_holder_on_another_host(tmp_path, caplog):
    lock_path = tmp_path / "entry.lock"
    holder, _ = hold_lock(lock_path, host="node-elsewhere.cluster")
    try:
        caplog.set_level(logging.INFO, logger="abliterate.cache")
        start = time.monotonic()
        with pytest.raises(cache.LockTimeout) as error, cache.file_lock(lock_path, timeout_s=1.5):
            pass
        waited = time.monotonic() - start
    finally:
        stop(holder)
    # a dead holder on another host cannot be detected: the timeout bounds the wait
    assert 1.5 <= waited < 6
    message = str(error.value)
    assert str(lock_path) in message
    assert f"node-elsewhere.cluster:{holder.pid} since" in message
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waiting) == 1  # one line, however long the wait
    assert waiting[0].startswith(f"waiting for {lock_path} held by node-elsewhere.cluster:")


def test_a_dead_local_holder_is_detected_and_the_wait_ends_early(tmp_path, caplog):
    lock_path = tmp_path / "entry.lock"
    # the recorded holder exits while a child that inherited its descriptor keeps the flock
    holder, orphan = hold_lock(lock_path, mode="orphan")
    holder.wait(timeout=10)
    dead = cache.read_holder(lock_path)
    assert dead is not None and dead.dead_here()
    caplog.set_level(logging.INFO, logger="abliterate.cache")
    try:
        start = time.monotonic()
        with cache.file_lock(lock_path, timeout_s=60):
            waited = time.monotonic() - start
            assert cache.read_holder(lock_path).pid == os.getpid()
    finally:
        os.kill(orphan, signal.SIGKILL)  # it sleeps holding the flock on the old inode
    assert waited < 15, waited
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"breaking lock {lock_path}") for m in messages), messages


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    lock_path = tmp_path / "entry.lock"
    holder, _ = hold_lock(lock_path)
    stop(holder)  # SIGKILL: no cleanup, the holder file stays behind
    assert cache.read_holder(lock_path).pid == holder.pid
    start = time.monotonic()
    with cache.file_lock(lock_path, timeout_s=30):
        assert time.monotonic() - start < 2
        assert cache.read_holder(lock_path).pid == os.getpid()  # the stale record is replaced


def test_lock_timeout_default_comes_from_config_then_environment(monkeypatch):
    monkeypatch.delenv(cache.LOCK_TIMEOUT_ENV, raising=False)
    assert cache.default_lock_timeout() == cache.DEFAULT_LOCK_TIMEOUT_S
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "12.5")
    assert cache.default_lock_timeout() == 12.5
    cache.configure_lock_timeout(3)
    try:
        assert cache.default_lock_timeout() == 3.0
    finally:
        cache.configure_lock_timeout(None)
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="ABLITERATE_LOCK_TIMEOUT='soon'"):
        cache.default_lock_timeout()
