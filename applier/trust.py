"""What applier refuses before it touches anything: an image of another process, an image
anyone could have written, and targets it must not stop (pid 1, itself, its ancestors).

* **Identity.** The image's task must be the target: the same pid, and a process that existed
  when the image was taken (``inventory.dump_uptime``, microseconds since boot, against the
  target's start time), so a reused pid is caught. ``other_process=True`` lifts both (the
  replica case: the layer of one process applied to another at the same state).
* **Trust.** Like sshd with its keys, an image directory, its files and its parent chain must
  be owned by the invoking user or root and writable by nobody else; so must the directories
  above them, unless they are sticky (``/tmp``). An undo directory must be too.
* **System processes.** pid 1, applier's own process and its ancestors are refused unless
  forced: stopping them stops applier's own shell or the system.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from applier.errors import MismatchError, UsageError
from formats import names
from formats.errors import ImageError
from injector.errors import NoSuchProcess
from injector.procfs import read_start_time, read_stat_ids, thread_state

__all__ = [
    "UntrustedImage",
    "check_identity",
    "check_target_allowed",
    "check_trusted",
    "check_undo_dir_trusted",
    "uptime_us",
]


class UntrustedImage(ImageError):
    """An image (or undo) directory that someone else could have written (exit 3)."""


class ProtectedTarget(UsageError):
    """A target applier does not stop unless forced (exit 2)."""


def uptime_us() -> int:
    """Microseconds since boot (CLOCK_BOOTTIME), as CRIU's ``dump_uptime``."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


def _start_us(pid: int) -> int:
    return read_start_time(pid) * 1_000_000 // os.sysconf("SC_CLK_TCK")


def check_identity(
    image_pid: int, dump_uptime: int | None, pid: int, *, other_process: bool, where: Path
) -> None:
    """Refuse an image of another process (``other_process`` allows it)."""
    if other_process:
        return
    if image_pid != pid:
        raise MismatchError(
            f"{where}: the image is of pid {image_pid}, not {pid} (--other-process applies "
            "it to another process)"
        )
    if dump_uptime:
        try:
            started = _start_us(pid)
        except OSError:
            return  # gone: the attach says so
        if started > dump_uptime:
            raise MismatchError(
                f"pid {pid} started {(started - dump_uptime) / 1e6:.2f} s after the image "
                f"{where} was taken: another process with a reused pid (--other-process "
                "applies it anyway)"
            )


def _writable_by_others(st: os.stat_result) -> str | None:
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_path(path: Path, what: str) -> None:
    st = path.stat()
    why = _writable_by_others(st)
    if why is not None:
        raise UntrustedImage(
            path,
            f"{what} is {why}: someone else could have written it (--trust-image uses it anyway)",
        )


def _check_ancestors(path: Path, what: str) -> None:
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_mode & stat.S_ISVTX:
            continue  # sticky (/tmp): others cannot replace what is ours in it
        why = _writable_by_others(st)
        if why is not None:
            raise UntrustedImage(
                path,
                f"{what} lies in {parent}, which is {why}: someone else could replace it "
                "(--trust-image uses it anyway)",
            )


def check_trusted(image_dir: Path, *, what: str = "image directory") -> None:
    """``image_dir``, its files and every parent snapshot (``parent`` links), each with its
    files, writable by no one but the invoking user or root; the directories above too."""
    seen: set[Path] = set()
    here: Path | None = image_dir
    while here is not None and here.resolve() not in seen:
        real = here.resolve()
        seen.add(real)
        _check_ancestors(real, what)
        _check_path(real, what)
        nxt = None
        for entry in real.iterdir():
            if entry.name == names.PARENT:
                nxt = entry
                continue
            if entry.is_file():
                _check_path(entry, f"{entry.name} of the {what}")
        here = nxt
        what = "parent snapshot"


def check_undo_dir_trusted(undo_dir: Path) -> None:
    """An undo directory (or, if it does not exist yet, the one it will be made in)."""
    target = undo_dir if undo_dir.exists() else undo_dir.parent
    _check_ancestors(target, "undo directory")
    if target.exists():
        _check_path(target, "undo directory")


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            pid = read_stat_ids(pid)[0]
        except OSError:
            break
    return out


def check_target_allowed(pid: int, *, force: bool) -> None:
    """Refuse a pid that does not exist, and pid 1, this process and its ancestors unless
    ``force``."""
    if thread_state(pid) is None:
        raise NoSuchProcess(pid, "no such process", errno.ESRCH)
    if force:
        return
    if pid == 1:
        raise ProtectedTarget("pid 1 is the init process: stopping it stops the system (--force)")
    if pid in _ancestors():
        what = "applier's own process" if pid == os.getpid() else "an ancestor of applier"
        raise ProtectedTarget(
            f"pid {pid} is {what}: stopping it would stop applier itself (--force)"
        )
