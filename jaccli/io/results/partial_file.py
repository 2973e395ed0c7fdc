"""The temporary file a results file is written to, renamed over the target when complete.

The file is created exclusively under a random name beside the target (``O_EXCL |
O_NOFOLLOW``, mode 0600: a planted symlink is never followed), HDF5 writes it through our own
descriptor, and only a complete file is given the usual mode and renamed over the target.

A write that fails (disk full, quota, file too large, I/O error) is recorded and later writes
are dropped, so HDF5 itself never sees a failure: HDF5 2.0 crashes the process at exit after a
failed close. `raise_if_failed` turns the recorded error into one OutputError line.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from ...errors import OutputError
from .output_guard import create_exclusive, partial_name
from .termination import mark_unsafe

_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for the file system or the file size limit",
         errno.EIO: "input/output error"}


class _DescriptorFile:
    """A seekable binary file over a descriptor, for h5py's file-object driver.

    Writes loop until complete; after the first failure nothing more is written and
    every call still succeeds (HDF5 must not see the error; see the module docstring).
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.position = 0
        self.error: OSError | None = None

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.position = offset
        elif whence == os.SEEK_CUR:
            self.position += offset
        else:
            self.position = os.fstat(self.fd).st_size + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.fd).st_size - self.position)
        data = bytearray(size)
        return bytes(data[:self.readinto(data)])

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = os.pread(self.fd, len(view), self.position)
            count = len(data)
            view[:count] = data
        except OSError as exc:
            self._fail(exc)
            count = 0
        self.position += count
        return count

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.position + done)
            except OSError as exc:
                self._fail(exc)
        self.position += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self._fail(exc)
        return size

    def flush(self) -> None:
        return None

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc


mark_unsafe(_DescriptorFile.seek, _DescriptorFile.tell, _DescriptorFile.read,
            _DescriptorFile.readinto,
            _DescriptorFile.write, _DescriptorFile.truncate, _DescriptorFile.flush,
            _DescriptorFile.seekable, _DescriptorFile.readable, _DescriptorFile.writable)


class PartialFile:
    """`.NAME.partial-PID-RANDOM` beside `target`, open for writing; `fileobj` is for h5py."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = self.target.with_name(
            partial_name(self.target, os.getpid(), secrets.token_hex(8)))
        try:
            fd = create_exclusive(self.path)
        except OSError as exc:
            raise OutputError(f"cannot create a temporary file beside {self.target}: "
                              f"{exc.strerror}") from exc
        self.fileobj = _DescriptorFile(fd)
        self._identity = _identity(os.fstat(fd))

    def raise_if_failed(self) -> None:
        """Raise OutputError if a write has failed."""
        error = self.fileobj.error
        if error is not None:
            why = _FULL.get(error.errno, error.strerror or str(error))
            raise OutputError(f"writing {self.target} failed: {why}; the partial output was "
                              "removed and any existing file there is unchanged")

    def commit(self) -> None:
        """Give the complete file the usual mode (0666 minus the umask), flush it to disk and
        rename it over the target, atomically."""
        self.raise_if_failed()
        fd = self.fileobj.fd
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        except OSError as exc:
            self.fileobj.error = exc
            self.raise_if_failed()
        try:
            if _identity(self.path.lstat()) != self._identity:
                raise OutputError(f"the temporary file {self.path} was replaced during the "
                                  f"run; {self.target} was not written")
            os.replace(self.path, self.target)
        except OSError as exc:
            raise OutputError(f"cannot rename the finished file to {self.target}: "
                              f"{exc.strerror}") from exc
        self._close()
        _sync_folder(self.target.parent)

    def discard(self) -> None:
        """Close and delete the temporary file (if it is still ours)."""
        self._close()
        try:
            if _identity(self.path.lstat()) == self._identity:
                self.path.unlink()
        except OSError:
            pass

    def _close(self) -> None:
        if self.fileobj.fd >= 0:
            os.close(self.fileobj.fd)
            self.fileobj.fd = -1


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
