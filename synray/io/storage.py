"""One URI layer over local paths and ``s3://bucket/prefix``.

Endpoints, regions and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance profiles, ...), never from configs that get logged.
Credentials never travel in pickled objects: S3 filesystems and clients are built without explicit keys,
so each process resolves them through the AWS default credential chain where it uses them (and
temporary credentials are refreshed by that chain, not frozen into a cached object). A pickled
:class:`Location` or filesystem (Ray task arguments, Tune's state on storage) carries only the endpoint
and region.

Writes are atomic: a temp file plus rename locally, and a single upload on S3 (an object becomes
visible only once its upload completes), so a file that exists is complete.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from functools import lru_cache

import pyarrow.fs as pafs

from synray.errors import UserError
from synray.redact import redact_text

#: the reachability probe of :func:`check_writable` answers in seconds, not after boto's default retries
#: (60 s connect and read timeouts, several attempts: minutes for an unreachable endpoint)
PROBE_CONNECT_TIMEOUT_S = 5.0
PROBE_READ_TIMEOUT_S = 20.0
PROBE_ATTEMPTS = 2


class StorageError(UserError, OSError):
    """A storage URI cannot be reached, read or written (the message has URI credentials masked)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(redact_text(str(message)))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``/`` separated for S3)."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[5:].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """An S3 filesystem on the AWS default credential chain: it holds (and pickles) no keys.

    Cached per endpoint and region only; the credential chain inside re-reads the environment and
    refreshes temporary credentials itself.
    """
    kwargs: dict = {}
    if endpoint:
        scheme = "http" if endpoint.startswith("http://") else "https"
        kwargs.update(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client():
    """A boto3 S3 client on the AWS default chain (endpoint, credentials and region from the environment)."""
    import boto3

    return boto3.client("s3")


@dataclass(frozen=True)
class Location:
    """A resolved URI: the pyarrow filesystem and the path inside it."""

    uri: str
    fs: pafs.FileSystem
    path: str


def resolve(uri: str) -> Location:
    """Map a URI to a pyarrow filesystem; S3 settings come from the AWS environment."""
    if not uri:
        raise StorageError("empty storage URI")
    if is_s3(uri):
        endpoint = _s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        path = uri[5:].strip("/")
        if not path:
            raise StorageError(f"S3 URI without a bucket: {uri}")
        return Location(uri, _s3_filesystem(endpoint, region), path)
    if uri.startswith("file://"):
        uri = uri[7:]
    return Location(uri, pafs.LocalFileSystem(), os.path.abspath(uri))


def _wrap(uri: str, action: str, exc: Exception) -> StorageError:
    return StorageError(f"cannot {action} {uri}: {exc}")


def exists(uri: str) -> bool:
    loc = resolve(uri)
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except Exception as exc:
        raise _wrap(uri, "reach", exc) from exc


def makedirs(uri: str) -> None:
    loc = resolve(uri)
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except Exception as exc:
        raise _wrap(uri, "create", exc) from exc


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the files directly inside ``uri``; empty if it does not exist."""
    loc = resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, "list", exc) from exc
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    try:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {uri}") from exc
    except Exception as exc:
        raise _wrap(uri, "read", exc) from exc


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either no file or the complete file, never a part."""
    loc = resolve(uri)
    try:
        if is_s3(uri):
            # A single PUT: S3 makes the object visible only when the whole body has arrived, so a
            # writer killed (or failing) mid-upload leaves nothing behind.
            bucket, _, key = loc.path.partition("/")
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        parent = os.path.dirname(loc.path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except StorageError:
        raise
    except Exception as exc:
        raise _wrap(uri, "write", exc) from exc


def delete(uri: str) -> None:
    loc = resolve(uri)
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise _wrap(uri, "delete", exc) from exc


def _probe_client():
    """A boto3 S3 client with bounded timeouts and attempts, for the first contact with an endpoint."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(
        connect_timeout=PROBE_CONNECT_TIMEOUT_S, read_timeout=PROBE_READ_TIMEOUT_S,
        retries={"total_max_attempts": PROBE_ATTEMPTS, "mode": "standard"}))


def check_writable(uri: str) -> None:
    """Fail fast (before any Ray work) when the output location cannot be written.

    On S3 the probe object is written and deleted with bounded timeouts and attempts, so an endpoint
    that refuses connections or never answers is reported within seconds as "unreachable storage".
    """
    probe = join(uri, f".synray-probe-{uuid.uuid4().hex[:8]}")
    if not is_s3(uri):
        write_bytes_atomic(probe, b"ok")
        delete(probe)
        return
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    bucket, _, key = resolve(probe).path.partition("/")
    client = _probe_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=key)
    except (BotoConnectionError, HTTPClientError) as exc:
        where = _s3_endpoint() or "the AWS S3 endpoint"
        raise StorageError(f"unreachable storage: {where} did not answer for {uri} "
                           f"({PROBE_ATTEMPTS} attempts, {PROBE_CONNECT_TIMEOUT_S:g} s connect / "
                           f"{PROBE_READ_TIMEOUT_S:g} s read timeout): {exc}") from exc
    except Exception as exc:
        raise _wrap(uri, "write", exc) from exc
