"""One writer per dataset folder: a job holds a lease on its output for as long as it runs.

Two jobs writing the same output would both see the same missing units and race on the manifest
(last writer wins). The lease makes the second one fail fast, naming the holder.

* Local (and any POSIX file system): ``<root>/.synray-lease`` locked with ``fcntl.flock``. The kernel
  drops the lock when the holder's process ends, however it ends, so a dead job never blocks.
  The file itself is never deleted (deleting a locked file lets two jobs lock two different files).
* S3: the object ``<root>/.synray-lease`` created with a conditional PUT (``If-None-Match: *``: only
  one creator wins), holding an owner id. The holder rewrites it every ``ttl/3`` with
  ``If-Match: <its ETag>``; if that fails, someone took the lease over and this job stops
  (:meth:`OutputLease.check`). A lease not refreshed for ``ttl`` seconds (by the server's clock:
  ``Last-Modified`` against the response ``Date``), or one whose holder ran on this host and is gone,
  is stale and may be taken over, again with ``If-Match`` on the stale ETag so that of two
  takers only one wins.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any

from synray.io import storage

LEASE_NAME = ".synray-lease"
#: seconds an S3 lease lives without a refresh; the holder refreshes every third of it
LEASE_TTL_S = 60.0


class LeaseError(RuntimeError):
    """Another job holds the output, or this job lost its lease."""


def _owner() -> dict[str, Any]:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another job"
    return f"job pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _pid_gone(holder: dict[str, Any]) -> bool:
    """True only when the holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class OutputLease:
    """The right to write one dataset folder; acquire with :func:`acquire_lease`, use as a context manager."""

    def __init__(self, dataset_uri: str, ttl_s: float = LEASE_TTL_S):
        self.uri = dataset_uri
        self.lease_uri = storage.join(dataset_uri, LEASE_NAME)
        self.ttl_s = float(ttl_s)
        self.info = _owner()
        self.lost: str | None = None
        self._fd: int | None = None
        self._etag: str | None = None
        self._seq = 0
        self._client = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- local ---------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        path = storage.resolve(self.lease_uri).path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder: dict[str, Any] = {}
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                pass
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LeaseError(f"cannot lock {path}: {exc}") from exc
            raise LeaseError(
                f"{self.uri} is being written by {_describe(holder)} (it holds {path}); two jobs must not write"
                " one output: wait for that job to end, or choose another output.uri"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self._fd = fd

    # --- S3 ------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        self._seq += 1
        return json.dumps({**self.info, "ttl_s": self.ttl_s, "seq": self._seq}).encode()

    def _key(self) -> tuple[str, str]:
        bucket, _, key = storage.resolve(self.lease_uri).path.partition("/")
        return bucket, key

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _acquire_s3(self) -> None:
        from botocore.exceptions import ClientError

        self._client = client = storage.s3_client()
        bucket, key = self._key()
        for _ in range(3):
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")["ETag"]
                return
            except ClientError as exc:
                if self._code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise LeaseError(f"cannot create the lease {self.lease_uri}: {exc}") from exc
            try:
                head = client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if self._code(exc) in ("NoSuchKey", "404"):
                    continue  # released meanwhile: try to create it again
                raise LeaseError(f"cannot read the lease {self.lease_uri}: {exc}") from exc
            holder = json.loads(head["Body"].read() or b"{}")
            now = head["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
            server_now = parsedate_to_datetime(now).timestamp() if now else time.time()
            age = server_now - head["LastModified"].timestamp()
            ttl = float(holder.get("ttl_s", self.ttl_s))
            if age <= ttl and not _pid_gone(holder):
                raise LeaseError(
                    f"{self.uri} is being written by {_describe(holder)} (lease {self.lease_uri} refreshed {age:.0f} s ago,"
                    f" stale after {ttl:.0f} s); two jobs must not write one output: wait for that job to end, or"
                    " choose another output.uri"
                )
            try:  # stale: take it over, unless another job does so first
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=head["ETag"])["ETag"]
                return
            except ClientError as exc:
                if self._code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey", "404"):
                    raise LeaseError(f"cannot take over the stale lease {self.lease_uri}: {exc}") from exc
        raise LeaseError(f"{self.uri}: another job took the lease {self.lease_uri} first; choose another output.uri")

    def refresh(self) -> None:
        """Rewrite the S3 lease (only if it is still ours); records a loss in :attr:`lost`."""
        if self._client is None or self.lost:
            return
        bucket, key = self._key()
        try:
            self._etag = self._client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=self._etag)["ETag"]
        except Exception as exc:  # noqa: BLE001 - any failure: decide below whether the lease is gone
            code = self._code(exc)
            if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                self.lost = f"the lease {self.lease_uri} was taken over by another job"
            # a transient error: the next refresh tries again; the lease lives ttl_s since the last success

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.refresh()
            if self.lost:
                return

    # --- both ----------------------------------------------------------------------------------

    def acquire(self) -> OutputLease:
        if storage.is_s3(self.uri):
            self._acquire_s3()
            self._thread = threading.Thread(target=self._heartbeat, name="synray-lease", daemon=True)
            self._thread.start()
        else:
            self._acquire_local()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseError` when this job no longer holds its output."""
        if self.lost:
            raise LeaseError(f"{self.uri}: {self.lost}; this job stops writing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._client is not None and not self.lost:
            bucket, key = self._key()
            try:
                self._client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception:  # noqa: BLE001 - not ours any more, or unreachable: it goes stale on its own
                pass
            self._client = None

    def __enter__(self) -> OutputLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(dataset_uri: str, ttl_s: float = LEASE_TTL_S) -> OutputLease:
    """Take the lease on ``dataset_uri`` or raise :class:`LeaseError` naming the job that holds it."""
    return OutputLease(dataset_uri, ttl_s).acquire()
