"""Check an output path before any work: not an input, in a writable folder, no stale partials.

A run that would replace one of its own inputs, or that can only find out after hours of
computing that its folder is read-only, is refused here in one line. Partial files left by a
killed run (``.NAME.partial-PID[-RANDOM]``) whose process is gone are removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from ...errors import OutputError

_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_WHY = {
    errno.EACCES: "no permission to create files there",
    errno.EPERM: "no permission to create files there",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a component of the folder path is not a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def partial_name(target: Path, pid: int, token: str) -> str:
    """The name of the temporary file a run writes before renaming it to `target`."""
    return f".{target.name}.partial-{pid}-{token}"


def create_exclusive(path: Path) -> int:
    """Create `path` as a new file, mode 0600, failing if anything (even a symlink) is there;
    return its descriptor."""
    return os.open(path, _CREATE_FLAGS, 0o600)


def check_output(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse `output` if it is an input, a folder or not a regular file, or if its folder
    cannot take a new file; then remove stale partial files of earlier killed runs.

    inputs: every file the run reads (model, data, targets, vectors, spec, results file);
        None and "-" (standard input) are skipped.
    """
    target = Path(output)
    for source in inputs:
        if source is None or str(source) == "-":
            continue
        if _same_file(target, Path(source)):
            raise OutputError(f"-o {target} is an input of this run ({source}); writing it "
                              "would replace the input: choose another output file")
    try:
        info = target.lstat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"cannot use -o {target}: {exc.strerror}") from exc
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise OutputError(f"-o {target} is a folder; give a file name, e.g. {target}/out.h5")
    if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
        raise OutputError(f"-o {target} exists and is not a regular file; choose another "
                          "output file")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write -o {target}: the folder {folder} does not exist")
    probe = folder / partial_name(target, os.getpid(), secrets.token_hex(8))
    try:
        os.close(create_exclusive(probe))
        os.unlink(probe)
    except OSError as exc:
        why = _WHY.get(exc.errno, exc.strerror)
        raise OutputError(f"cannot write -o {target}: {why} ({folder})") from exc
    remove_stale_partials(target)


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete this user's partial files for `target` whose writing process no longer runs;
    return them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.partial-(\d+)(?:-[0-9a-f]+)?$")
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if not match or _process_alive(int(match.group(1))):
            continue
        path = target.parent / name
        try:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid: leave the file alone
    return True


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name the same file: same path once links are resolved, or the
    same inode (hard links)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# Room left on the output's file system by default: 10% of the free space, at most 1 GiB.
FREE_MARGIN = 0.10
FREE_MARGIN_CAP = 1024**3


def free_space(output: str | Path) -> int | None:
    """Bytes free (for this user) on the file system that will hold `output`, or None."""
    try:
        info = os.statvfs(Path(output).resolve().parent)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def output_cap(output: str | Path, max_output: int | None) -> tuple[int | None, str]:
    """How many bytes the output may take, and why: `--max-output`, else the free space less
    a margin (10%, at most 1 GiB); None when the free space cannot be read."""
    if max_output is not None:
        return max_output, "--max-output"
    free = free_space(output)
    if free is None:
        return None, "free space unknown"
    return max(0, free - min(int(free * FREE_MARGIN), FREE_MARGIN_CAP)), \
        "the free space on its file system, less a margin"
