"""A node's files are its own: the data directory is 0700 and every file in it 0600.

The database, its -wal and -shm files, log segments, snapshots, membership.json and node.log hold
every row the cluster stores, so no other local user may read them, whatever umask the process
was started with. Rather than give each of the many places that create files a mode,
`secure_data_dir` narrows the process umask (SQLite creates -wal and -shm with the database
file's own mode, so they follow) and fixes the modes of what an older version left behind.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("raftsql.fileperms")

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077


def private_umask() -> int:
    """Narrow this process's umask so new files are 0600 and new directories 0700.

    Only ever narrows: bits the old umask already masked stay masked. Returns the old umask.
    """
    old = os.umask(UMASK)
    os.umask(old | UMASK)
    return old


def secure_data_dir(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """Create `path` (0700) if needed, narrow the umask (see `private_umask`), and chmod every
    directory under it to 0700 and every regular file to 0600. Symbolic links are not followed.

    Returns (path, old mode, new mode) for each change, which it also logs: files found wider
    than 0600 were readable by others until now.
    """
    private_umask()
    path = os.fspath(path)
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    changed: list[tuple[str, int, int]] = []

    def fix(p: str, want: int, is_dir: bool) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:  # removed meanwhile
            return
        if is_dir != stat.S_ISDIR(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return  # a symbolic link, socket or fifo: not ours to chmod
        old = stat.S_IMODE(st.st_mode)
        if old == want:
            return
        try:
            os.chmod(p, want)  # lstat said: not a symbolic link
        except OSError as e:
            log.warning("cannot make %s private (mode %04o): %s", p, old, e.strerror or e)
            return
        changed.append((p, old, want))

    fix(path, DIR_MODE, True)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            fix(os.path.join(dirpath, name), DIR_MODE, True)
        for name in filenames:
            fix(os.path.join(dirpath, name), FILE_MODE, False)
    if changed:
        shown = ", ".join(f"{os.path.relpath(p, path)} {old:04o}->{new:04o}" for p, old, new in changed[:10])
        more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        log.warning("made %d path(s) in %s private (others could read them): %s%s",
                    len(changed), path, shown, more)
    return changed


def open_private_log(path: str | os.PathLike[str]):
    """Open `path` for appending, binary, creating it 0600 (an existing file is narrowed to 0600).

    For node.log, which a launcher opens before the node process starts."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")


def private_dir(path: str | os.PathLike[str]) -> None:
    """mkdir -p `path` and make it (only it, not its parents) 0700."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
