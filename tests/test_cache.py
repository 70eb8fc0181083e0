"""The caching layer: atomic writes, stale staging, checksummed entries, locks, lock support."""

from __future__ import annotations

import errno
import json
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
    with pytest.raises(ConfigError, match="ABLITERATE_LOCK_TIMEOUT=.soon. must be"):
        cache.default_lock_timeout()


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_whole_and_leaves_no_staging(tmp_path):
    path = tmp_path / "results.json"
    cache.write_text_atomic(path, lambda handle: handle.write("first"))
    cache.write_text_atomic(path, lambda handle: handle.write("second"))
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_write_failure_cleans_up_and_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("earlier")

    def half_then_fail(handle):
        handle.write("half")
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):
        cache.write_text_atomic(path, half_then_fail)
    assert path.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    def full_disk(_descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"could not write .*results\.json: No space left") as error:
        cache.write_text_atomic(path, lambda handle: handle.write("new"))
    assert error.value.errno == errno.ENOSPC
    assert path.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_safetensors_full_disk_is_the_same_one_line_error(tmp_path, monkeypatch):
    import torch

    path = tmp_path / "directions.safetensors"
    cache.save_safetensors_atomic(path, {"vectors": torch.ones(2, 3)}, {"layer": "1"})
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["vectors"], torch.ones(2, 3))
    real_write = Path.write_bytes

    def full_disk(self, data):
        real_write(self, data[: len(data) // 2])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match=r"could not write .*directions\.safetensors: No space"):
        cache.save_safetensors_atomic(path, {"vectors": torch.zeros(2, 3)})
    monkeypatch.undo()
    assert torch.equal(load_file(str(path))["vectors"], torch.ones(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["directions.safetensors"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def test_stale_staging_is_swept_when_the_cache_is_opened(tmp_path):
    root = tmp_path / "activations"
    root.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    dead = root / f".abc.{cache.HOST}.{_dead_pid()}.tmp"
    live = root / f".def.{cache.HOST}.{os.getpid()}.tmp"
    elsewhere_fresh = root / ".ghi.node-elsewhere.cluster.123.tmp"
    elsewhere_old = root / ".jkl.node-elsewhere.cluster.123.tmp"
    legacy_old = root / "mno.safetensors.tmp-4242"
    entry = root / "0123456789abcdef0123"
    for path in (dead, live, elsewhere_fresh, elsewhere_old, legacy_old):
        path.write_text("partial")
    dead_dir = root / f".pqr.{cache.HOST}.{_dead_pid()}.tmp"
    (dead_dir / "nested").mkdir(parents=True)
    entry.mkdir()
    for path in (elsewhere_old, legacy_old):
        os.utime(path, (two_days_ago, two_days_ago))
    os.utime(entry, (two_days_ago, two_days_ago))  # an entry is never staging, however old

    cache.DiskCache(tmp_path, "activations")
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([live.name, elsewhere_fresh.name, entry.name])


# ---------------------------------------------------------------------------------------------
# Checksummed entries


class Builder:
    """A cache entry's create/load pair that counts its builds."""

    def __init__(self, text: str = "payload"):
        self.text = text
        self.builds = 0

    def create(self, directory: Path) -> str:
        self.builds += 1
        (directory / "data.txt").write_text(self.text)
        (directory / "sub").mkdir()
        (directory / "sub" / "more.json").write_text(json.dumps({"n": self.builds}))
        return self.text

    @staticmethod
    def load(directory: Path) -> str:
        return (directory / "data.txt").read_text()


def test_entry_is_built_once_then_read_back_verified(tmp_path):
    builder = Builder()
    disk = cache.DiskCache(tmp_path, "things")
    assert disk.get_or_create("k1", builder.load, builder.create) == ("payload", False)
    assert disk.get_or_create("k1", builder.load, builder.create) == ("payload", True)
    assert builder.builds == 1
    manifest = json.loads((tmp_path / "things" / "k1" / cache.MANIFEST).read_text())
    assert set(manifest["files"]) == {"data.txt", "sub/more.json"}
    assert manifest["files"]["data.txt"]["sha256"] == cache.file_sha256(
        tmp_path / "things" / "k1" / "data.txt"
    )
    # no staging and no holder file left (the lock file itself may stay)
    assert set(p.name for p in (tmp_path / "things").iterdir()) <= {"k1", "k1.lock"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_checksum_mismatch_rebuilds_with_one_warning(tmp_path, caplog, damage):
    builder = Builder()
    disk = cache.DiskCache(tmp_path, "things")
    disk.get_or_create("k1", builder.load, builder.create)
    entry = tmp_path / "things" / "k1"
    data = entry / "sub" / "more.json"
    if damage == "flip":  # same size, other bytes: only the sha256 sees it
        data.write_text(data.read_text().replace("1", "7"))
    elif damage == "truncate":
        data.write_text("")
    elif damage == "delete":
        data.unlink()
    else:
        (entry / cache.MANIFEST).write_text("{not json")
    cache._verified.clear()  # as in a new process (a changed file is re-hashed anyway)
    caplog.set_level(logging.WARNING, logger="abliterate.cache")
    assert disk.get_or_create("k1", builder.load, builder.create) == ("payload", False)
    assert builder.builds == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"cache entry {entry} is damaged")
    assert cache.verify_entry(entry) is None  # the rebuilt entry is intact
    assert disk.get_or_create("k1", builder.load, builder.create) == ("payload", True)


def test_an_entry_that_does_not_load_is_rebuilt(tmp_path, caplog):
    builder = Builder()
    disk = cache.DiskCache(tmp_path, "things")
    disk.get_or_create("k1", builder.load, builder.create)

    def broken_load(_directory):
        raise KeyError("tensor")

    caplog.set_level(logging.WARNING, logger="abliterate.cache")
    value, hit = disk.get_or_create("k1", broken_load, builder.create)
    assert (value, hit, builder.builds) == ("payload", False, 2)
    assert "does not load (KeyError" in caplog.text


def test_entry_without_manifest_is_adopted_only_where_allowed(tmp_path, caplog):
    legacy = tmp_path / "things" / "old"
    legacy.mkdir(parents=True)
    (legacy / "data.txt").write_text("from an earlier version")
    builder = Builder()
    caplog.set_level(logging.INFO, logger="abliterate.cache")
    adopting = cache.DiskCache(tmp_path, "things", adopt=True)
    assert adopting.get_or_create("old", builder.load, builder.create) == (
        "from an earlier version",
        True,
    )
    assert builder.builds == 0
    manifest = json.loads((legacy / cache.MANIFEST).read_text())
    assert manifest["adopted"] is True and list(manifest["files"]) == ["data.txt"]
    assert "predates checksums" in caplog.text

    (legacy / cache.MANIFEST).unlink()
    strict = cache.DiskCache(tmp_path, "things")
    assert strict.get_or_create("old", builder.load, builder.create) == ("payload", False)
    assert "it has no manifest" in caplog.text


# ---------------------------------------------------------------------------------------------
# Lock support


def test_check_lock_support_passes_on_a_local_directory(tmp_path):
    cache._check_lock_support.cache_clear()
    cache.check_lock_support(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir()
    assert list((tmp_path / "cache").iterdir()) == []  # the probe cleans up


def test_check_lock_support_fails_with_one_line_naming_cache_dir(tmp_path, monkeypatch):
    cache._check_lock_support.cache_clear()
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    with pytest.raises(ConfigError, match=r"^paths\.cache_dir='.*file/cache' does not support"):
        cache.check_lock_support(in_the_way / "cache")
    # a file system whose locks do not exclude another process (simulated: the second
    # process's attempt succeeds)
    monkeypatch.setattr(cache, "_PROBE_SCRIPT", "import sys; sys.exit(3)")
    with pytest.raises(ConfigError) as error:
        cache.check_lock_support(tmp_path / "nfs")
    assert "a second process acquired a lock this process held" in str(error.value)
    assert "\n" not in str(error.value)
    cache._check_lock_support.cache_clear()


# ---------------------------------------------------------------------------------------------
# The refuser build as a cache entry (with a stand-in for the 20-minute build)


def _fake_refuser_files(directory: Path, value: float) -> None:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.full((4, 4), value)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "refuser_card.json").write_text(json.dumps({"meets_targets": True}))


def test_refuser_build_without_manifest_is_adopted_and_damaged_weights_rebuilt(
    tmp_path, monkeypatch, caplog
):
    from abliterate import provenance, refuser

    builds = []

    def fake_build(output_dir, recipe, base_path):
        builds.append(output_dir)
        _fake_refuser_files(output_dir, 2.0)
        return {}

    monkeypatch.setattr(refuser, "build_refuser", fake_build)
    name = f"smollm2-135m-refuser-{refuser.refuser_key(refuser.recipe_named(None), refuser.find_base_gguf())}"
    legacy = tmp_path / "models" / name
    _fake_refuser_files(legacy, 1.0)  # as an earlier version left it: card, weights, no manifest
    identity = provenance.folder_signature(legacy)
    caplog.set_level(logging.INFO, logger="abliterate.cache")

    assert refuser.ensure_refuser(tmp_path) == legacy
    assert builds == []  # adopted, not rebuilt
    assert json.loads((legacy / cache.MANIFEST).read_text())["adopted"] is True
    # the manifest is not part of the model's identity: no activation or evaluation cache key
    # changes because of it
    assert provenance.folder_signature(legacy) == identity
    assert refuser.ensure_refuser(tmp_path) == legacy and builds == []

    weights = legacy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight: the header still reads, only the sha256 sees it
    weights.write_bytes(bytes(data))
    caplog.clear()
    assert refuser.ensure_refuser(tmp_path) == legacy
    assert len(builds) == 1 and builds[0].name.endswith(".tmp")  # built in staging, renamed
    from safetensors.torch import load_file

    assert float(load_file(str(weights))["weight"][0, 0]) == 2.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.safetensors fails its sha256" in warnings[0]
    assert json.loads((legacy / cache.MANIFEST).read_text())["adopted"] is False


def test_lock_timeout_setting_is_checked(monkeypatch):
    for bad in (-1, float("nan"), float("inf"), "soon"):
        with pytest.raises(ConfigError, match=r"^paths\.lock_timeout_s=.* must be a finite"):
            cache.configure_lock_timeout(bad)
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "-5")
    with pytest.raises(ConfigError, match="ABLITERATE_LOCK_TIMEOUT='-5' must be a finite"):
        cache.default_lock_timeout()


def test_an_error_of_the_computation_is_not_called_a_write_error(tmp_path):
    disk = cache.DiskCache(tmp_path, "things")

    def create(_directory):
        (tmp_path / "no-such-model" / "config.json").read_text()

    with pytest.raises(FileNotFoundError) as error:
        disk.get_or_create("k1", Builder.load, create)
    assert "could not write" not in str(error.value) and "no-such-model" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "things").iterdir() if p.name != "k1.lock") == []


def test_a_cache_lock_timeout_is_one_error_line_through_the_cli(tmp_path):
    from abliterate import refuser

    repo = Path(__file__).resolve().parents[1]
    name = f"smollm2-135m-refuser-{refuser.refuser_key(refuser.recipe_named(None), refuser.find_base_gguf())}"
    lock_path = tmp_path / "cache" / "models" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True)
    # another node is building the embedded model (and may have died: no way to tell from here)
    holder, _ = hold_lock(lock_path, host="node-elsewhere.cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(HOME=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(
            [sys.executable, "run.py", "logger=none", "eval=quick",
             f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
             "paths.lock_timeout_s=1"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        stop(holder)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: timed out after 1 s waiting for lock {lock_path}, held by ")
    assert f"node-elsewhere.cluster:{holder.pid} since" in line
    assert not (tmp_path / "cache" / "models" / name).exists()
