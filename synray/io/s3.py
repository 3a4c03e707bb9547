"""Ray Train's storage on a job's output URI; on S3 every write is one boto3 upload made when its stream closes.

:func:`run_storage` gives the ``(storage_path, storage_filesystem)`` pair Ray Train's ``RunConfig`` takes;
on S3 the filesystem is :class:`BotoUploadHandler`, which reads and lists through pyarrow and writes
through :func:`synray.io.storage.s3_client`, like :func:`synray.io.storage.write_bytes_atomic`.
"""

from __future__ import annotations

import io
import sys

import pyarrow as pa
import pyarrow.fs as pafs

from synray.io import storage

__all__ = ["UploadOnClose", "BotoUploadHandler", "run_storage"]


class UploadOnClose(io.BytesIO):
    """A write buffer that becomes one S3 object when closed (visible only once complete).

    Nothing is published when the writer fails: a stream closed while an exception propagates (a ``with``
    block that raised) is discarded, and a writer killed mid-write never reaches the upload.
    """

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__()
        self.bucket, self.key = bucket, key

    def close(self) -> None:
        if not self.closed and sys.exc_info()[0] is not None:
            super().close()  # the writer failed: publish nothing
            return
        if not self.closed:
            data = self.getbuffer()
            if len(data) < 4 * 2**30:  # one PUT: the object appears only when complete
                storage.s3_client().put_object(Bucket=self.bucket, Key=self.key, Body=bytes(data))
            else:  # beyond a single PUT's limit: boto3's managed multipart upload
                storage.s3_client().upload_fileobj(io.BytesIO(bytes(data)), self.bucket, self.key)
            del data
        super().close()


class BotoUploadHandler(pafs.FileSystemHandler):
    """S3 for Ray Train's storage: reads and listings through pyarrow, writes as boto3 uploads.

    Every write (checkpoint files, Ray's run-state files) is staged in memory and uploaded when the
    stream closes, so a reader never sees a partial object. It also keeps S3-compatible servers whose
    CompleteMultipartUpload replies pyarrow rejects (e.g. moto before 5.2.5) usable for checkpoints.
    """

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BotoUploadHandler) and self.fs.equals(other.fs)

    def __reduce__(self):
        return (BotoUploadHandler, (self.fs,))

    def get_type_name(self) -> str:
        return "synray-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata=None):
        bucket, _, key = path.lstrip("/").partition("/")
        if not key:
            raise OSError(f"cannot write an object at bucket level: {path}")
        return pa.PythonFile(UploadOnClose(bucket, key), mode="w")

    def open_append_stream(self, path: str, metadata=None):
        raise OSError("S3 objects cannot be appended to")


def run_storage(uri: str) -> tuple[str, pafs.FileSystem]:
    """``(path, filesystem)`` for Ray Train's ``RunConfig(storage_path=, storage_filesystem=)``."""
    loc = storage.resolve(uri)
    if storage.is_s3(uri):
        return loc.path, pafs.PyFileSystem(BotoUploadHandler(loc.fs))
    return loc.path, loc.fs
