"""One writer at a time: a lease on a token dataset's location (`vqtok tokenize --out`).

A run takes the lease before it reads the manifest and holds it to its end, so two runs into one
OUT (same tokenizer or not) cannot interleave: the second is refused in seconds, naming the holder.

    lease = Lease.acquire(fs, root, url, ttl=60)   # raises LeaseHeld naming the holder
    lease.check()                                  # before each commit: raises LeaseLost if it was lost
    lease.release()

Three kinds, by where OUT lives:

- **Local disk** (`OUT/_lease`): an exclusive `flock` on the file, which holds the holder's
  description (run id, host, pid, start, heartbeat). The kernel drops the lock when the process
  dies, however it dies, so a crashed run never blocks the next one and the lease cannot be lost
  while its process lives. On a network filesystem this is as good as the filesystem's locks
  (NFSv4: yes; some FUSE mounts: no).
- **S3 and S3-compatible stores** (`OUT/_lease.json`): created with a conditional PUT
  (`If-None-Match: *`: of two runs starting at the same instant the store lets exactly one
  create it), renewed every ttl/4 with `If-Match: <its ETag>`. A lease whose heartbeat is older
  than ttl (by the reader's clock; clocks are assumed to agree within a few seconds), or whose
  holder was on this host and whose pid is gone, is taken over with `If-Match` too, so of two
  runs taking over one wins. A holder that cannot renew (a takeover happened, or the store was
  unreachable for ttl) marks the lease lost and stops before its next commit. What remains: a
  holder stalled longer than ttl between its check and its write can still write one part and one
  commit record; both carry its run id, which the new holder's manifest does not name, so readers
  ignore them and the next compaction deletes them.
- **Other fsspec filesystems** (no conditional writes): the lease file is written when absent and
  read back to check it is ours. Good against a second run started later; two runs started in the
  same instant can both believe they hold it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError

DEFAULT_TTL = 60.0  # seconds without a heartbeat after which an object-store lease is free


class LeaseHeld(ConfigError):
    """Another live run holds the lease on this OUT."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or could not be renewed): it must stop writing."""


@dataclass
class Holder:
    run: str
    host: str
    pid: int
    started: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            d = json.loads(data)
            return cls(str(d["run"]), str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"run {self.run} (host {self.host}, pid {self.pid}, started {started}, last heartbeat "
                f"{max(0.0, time.time() - self.heartbeat):.0f} s ago)")

    def dead_on_this_host(self) -> bool:
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False


class Lease:
    """Base: the holder description and the heartbeat thread; subclasses take, renew and drop."""

    FREED = "if that run is dead, its lease expires {ttl:.0f} s after its last heartbeat"  # for the refusal

    def __init__(self, fs, root: str, url: str, ttl: float):
        self.fs, self.root, self.url, self.ttl = fs, root, url, float(ttl)
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex[:8], socket.gethostname(), os.getpid(), now, now)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def run(self) -> str:
        """This run's id (8 hex digits): part files and commit records carry it."""
        return self.holder.run

    @classmethod
    def acquire(cls, fs, root: str, url: str, ttl: float = DEFAULT_TTL) -> "Lease":
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        kind = LocalLease if isinstance(fs, LocalFileSystem) else S3Lease if protocols & {"s3", "s3a"} else BestEffortLease
        lease = kind(fs, root, url, ttl)
        lease._take()
        lease._thread = threading.Thread(target=lease._beat, name="vqtok-lease", daemon=True)
        lease._thread.start()
        return lease

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"--out {self.url}: this run lost its lease ({self.lost}); another run may be writing "
                            f"there. This run stops; nothing it wrote after losing the lease is read")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost:
            self._drop()

    def _beat(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(max(0.5, self.ttl / 4)):
            self.holder.heartbeat = time.time()
            try:
                self._renew()
                last_ok = time.time()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except OSError as e:
                if time.time() - last_ok > self.ttl:
                    self.lost = f"not renewed for {self.ttl:.0f} s: {e}"
                    return

    def _refuse(self, holder: Holder | None) -> LeaseHeld:
        who = holder.describe() if holder else "a run that is still writing its description"
        hint = self.FREED.format(ttl=self.ttl)
        return LeaseHeld(f"--out {self.url} is being written by another run: {who}. Wait for it to finish or stop "
                         f"it, or write to another --out ({hint})")

    # subclasses
    def _take(self) -> None: ...
    def _renew(self) -> None: ...
    def _drop(self) -> None: ...


class LocalLease(Lease):
    FREED = "it is released the moment that process ends"

    def _take(self) -> None:
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, "_lease")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise self._refuse(holder) from None
        self.fd = fd
        self._renew()

    def _renew(self) -> None:
        data = self.holder.encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def _drop(self) -> None:
        import fcntl

        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class S3Lease(Lease):
    def _take(self) -> None:
        self.path = f"{self.root}/_lease.json"
        self.bucket, self.key, _ = self.fs.split_path(self.path)
        for _ in range(5):
            try:
                self.etag = self._put(IfNoneMatch="*")
                return
            except (FileExistsError, OSError) as e:
                if not _precondition_failed(e):
                    raise
            found = self._read()
            if found is None:  # released between our PUT and our read: try again
                continue
            holder, etag = found
            if not (holder is None or time.time() - holder.heartbeat > self.ttl or holder.dead_on_this_host()):
                raise self._refuse(holder)
            try:  # expired: take it over, unless someone else just did
                self.etag = self._put(IfMatch=etag)
                return
            except OSError as e:
                if not _precondition_failed(e):
                    raise
        raise self._refuse(None)

    def _put(self, **condition) -> str:
        response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self.holder.encode(), **condition)
        self.fs.invalidate_cache(self.path)
        return response["ETag"]

    def _read(self) -> tuple[Holder | None, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path)["ETag"]  # first the version, then its (same or newer) content
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return Holder.parse(data), etag

    def _renew(self) -> None:
        try:
            self.etag = self._put(IfMatch=self.etag)
        except OSError as e:
            if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                found = self._read()
                raise LeaseLost(f"taken over by {found[0].describe() if found and found[0] else 'another run'}") from None
            raise

    def _drop(self) -> None:
        found = self._read()
        if found is not None and found[1] == self.etag:
            self.fs.rm_file(self.path)


class BestEffortLease(Lease):
    def _take(self) -> None:
        self.path = f"{self.root}/_lease.json"
        try:
            holder = Holder.parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            holder = None
        if holder is not None and time.time() - holder.heartbeat <= self.ttl and not holder.dead_on_this_host():
            raise self._refuse(holder)
        self.fs.pipe_file(self.path, self.holder.encode())
        time.sleep(0.2)  # a run that wrote at the same moment: whoever was last keeps it
        if Holder.parse(self.fs.cat_file(self.path)) != self.holder:
            raise self._refuse(Holder.parse(self.fs.cat_file(self.path)))

    def _renew(self) -> None:
        holder = Holder.parse(self.fs.cat_file(self.path))
        if holder is None or holder.run != self.holder.run:
            raise LeaseLost(f"taken over by {holder.describe() if holder else 'another run'}")
        self.fs.pipe_file(self.path, self.holder.encode())

    def _drop(self) -> None:
        try:
            holder = Holder.parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return
        if holder is not None and holder.run == self.holder.run:
            self.fs.rm_file(self.path)


def _precondition_failed(e: Exception) -> bool:
    """s3fs turns HTTP 412 into FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match), and
    409 (a conditional write racing another) into OSError(EBUSY)."""
    return isinstance(e, FileExistsError) or getattr(e, "errno", None) in (errno.EINVAL, errno.EBUSY)
