"""Dirty tracking with userfaultfd asynchronous write-protection and ``PAGEMAP_SCAN``.

Follows ``Documentation/admin-guide/mm/userfaultfd.rst`` ("Write Protect Notifications",
``UFFD_FEATURE_WP_ASYNC``) and ``Documentation/admin-guide/mm/pagemap.rst`` (``PAGEMAP_SCAN``).

The userfaultfd is created *inside* the target by an injected ``userfaultfd()`` (its context
belongs to the mm of the process that creates it); the tracer takes a copy with
``pidfd_getfd`` and drives ``UFFDIO_API``/``UFFDIO_REGISTER``/``UFFDIO_WRITEPROTECT`` from its
side, and ``PAGEMAP_SCAN`` on ``/proc/PID/pagemap``. Either the target's descriptor stays open
(``in_target=True``: tracking outlives the session by itself), or it is closed in the target
at once (``in_target=False``): the target then holds nothing, and tracking lasts as long as a
copy outside it does (:meth:`UffdWpTracker.hand_over` gives the copy away, ``resume(...,
fd=)`` takes one back). With async write-protection the kernel resolves a
write fault itself by dropping the page's protection, which ``PAGEMAP_SCAN`` reports as
``PAGE_IS_WRITTEN``. Writes by the kernel (``read()`` into a buffer), by a tracer and
``MADV_DONTNEED`` all drop it too.

Only registered memory answers truthfully. Every scan and reset therefore first asks the
kernel which tracked ranges are *not* registered (``PAGE_IS_WPALLOWED`` clear: a new mmap,
brk growth, a moved mremap, munmap+mmap at the same address), registers them and counts them
as written in full until the next reset, which write-protects them whole.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import mmap
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from injector import _uffd
from injector.arrays import union
from injector.errors import InjectorError
from injector.maps import Mapping
from injector.process import Process
from injector.procfs import read_start_time
from injector.tracking.base import (
    DirtyTracker,
    PageArray,
    Pending,
    Range,
    TrackerLost,
    TrackerState,
    TrackerUnavailable,
    TrackingError,
    intersect,
    merge,
    normalise,
    pages_in,
    subtract,
    tracked_ranges,
)
from injector.workers import worker

__all__ = ["UffdWpTracker", "probe_uffd_wp"]

O_CLOEXEC = 0o2000000
FEATURES = _uffd.UFFD_FEATURE_WP_ASYNC | _uffd.UFFD_FEATURE_WP_UNPOPULATED
WRITTEN = _uffd.PAGE_IS_WRITTEN
WPALLOWED = _uffd.PAGE_IS_WPALLOWED

# (maps, writable ranges, tracked ranges, ranges to scan) of one refresh
_Layout = tuple[Sequence[Mapping], list[Range], list[Range], list[Range]]


_FDINFO_API = re.compile(rb"^API:\s*([0-9a-f]+):([0-9a-f]+):", re.MULTILINE)

_probe_cache: list[str | None] = []


def _probe() -> str | None:
    """Try the whole mechanism on one page of this process; ``None`` if it works."""
    flags = O_CLOEXEC | _uffd.UFFD_USER_MODE_ONLY
    try:
        fd = _uffd.userfaultfd(flags)
    except OSError as exc:
        return f"userfaultfd() failed: {exc.strerror}"
    try:
        # A handshake with no features answers the supported set; a second handshake on
        # the same descriptor is refused, so the real one needs a new descriptor.
        features, _ = _uffd.uffd_api(fd, 0)
    except OSError as exc:
        return f"UFFDIO_API failed: {exc.strerror}"
    finally:
        os.close(fd)
    if FEATURES & ~features:
        return f"userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (features {features:#x})"
    page = mmap.mmap(-1, _uffd.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = pagemap = -1
    try:
        fd = _uffd.userfaultfd(flags)
        _uffd.uffd_api(fd, FEATURES)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        _uffd.uffd_register(fd, addr, _uffd.PAGE_SIZE)
        _uffd.uffd_writeprotect(fd, addr, _uffd.PAGE_SIZE)
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        scanner = _uffd.PageScanner(pagemap, 4)
        end = addr + _uffd.PAGE_SIZE
        before = scanner.scan(addr, end, category_mask=WRITTEN | WPALLOWED)
        page[0] = 1
        after = scanner.scan(addr, end, category_mask=WRITTEN | WPALLOWED)
        if len(before) != 0 or len(after) != 1:
            return "PAGEMAP_SCAN did not report a write to a write-protected page"
        return None
    except OSError as exc:
        return str(exc)
    finally:
        for descriptor in (fd, pagemap):
            if descriptor >= 0:
                os.close(descriptor)
        with contextlib.suppress(BufferError):
            page.close()


def probe_uffd_wp() -> str | None:
    """``None`` if async userfaultfd write-protection and PAGEMAP_SCAN work, else why not."""
    if not _probe_cache:
        _probe_cache.append(_probe())
    return _probe_cache[0]


def _os_error(pid: int, what: str, exc: OSError) -> TrackingError:
    return TrackingError(pid, f"{what}: {exc.strerror or exc}", exc.errno or 0)


class UffdWpTracker(DirtyTracker):
    """userfaultfd-wp tracker; the remote descriptor number identifies it in the target."""

    backend_name = "uffd-wp"

    def __init__(
        self,
        session: Process,
        *,
        local_fd: int,
        remote_fd: int,
        registered: Iterable[Range] = (),
        fresh: Iterable[Range] = (),
        start_time: int | None = None,
    ) -> None:
        super().__init__(session)
        self.local_fd = local_fd
        self.remote_fd = remote_fd
        self.inode = os.fstat(local_fd).st_ino
        self.start_time = read_start_time(self.pid) if start_time is None else start_time
        self._registered = merge(registered)
        self._fresh = merge(fresh)
        # (session, layout epoch) of the last refresh: a reset in the same layout skips its own
        self._refreshed: tuple[object, int] | None = None
        self._pending: concurrent.futures.Future[Any] | None = None  # a scan on the worker
        self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._scanner = _uffd.PageScanner(self._pagemap)

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def open(cls, session: Process, *, in_target: bool = True) -> UffdWpTracker:
        """Create a userfaultfd in the target, register its private writable memory, reset.

        ``in_target=False``: close the target's descriptor once this process has its copy, so
        the target never runs with a descriptor it did not open (``remote_fd`` is then -1).
        """
        pid = session.pid
        reason = probe_uffd_wp()
        if reason is not None:
            raise TrackerUnavailable(pid, f"uffd-wp: {reason}")
        try:
            remote = session.userfaultfd(O_CLOEXEC | _uffd.UFFD_USER_MODE_ONLY)
        except InjectorError as exc:
            raise TrackerUnavailable(
                pid, f"uffd-wp: userfaultfd() in the target failed: {exc}", exc.errno or 0
            ) from exc
        local = -1
        try:
            local = session.pidfd_getfd(remote)
            if not in_target:
                session.close(remote)
                remote = -1
            _uffd.uffd_api(local, FEATURES)
            tracker = cls(session, local_fd=local, remote_fd=remote)
        except BaseException as exc:
            if local >= 0:
                os.close(local)
            if remote >= 0:
                with contextlib.suppress(InjectorError):
                    session.close(remote)
            if isinstance(exc, OSError) and not isinstance(exc, InjectorError):
                raise _os_error(pid, "uffd-wp: UFFDIO_API", exc) from exc
            raise
        try:
            tracker.reset()
        except BaseException:
            tracker.close()
            raise
        return tracker

    @classmethod
    def resume(
        cls, session: Process, state: TrackerState, *, fd: int | None = None
    ) -> UffdWpTracker:
        """Take the target's userfaultfd again and continue where ``state`` left off.

        ``fd``: the userfaultfd itself, held outside the target (``state.remote_fd`` is -1);
        the tracker owns it from here (closed on release or close, also on failure).
        """
        pid = session.pid
        try:
            if state.backend != cls.backend_name:
                raise TrackerLost(pid, f"state is for backend {state.backend!r}, not uffd-wp")
            if state.pid != pid or read_start_time(pid) != state.start_time:
                raise TrackerLost(pid, f"state belongs to another process (pid {state.pid})")
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            return cls._adopt(session, state, fd)
        if state.remote_fd < 0:
            raise TrackerLost(pid, "its userfaultfd is held outside the target, and was not given")
        fdinfo = Path(f"/proc/{pid}/fdinfo/{state.remote_fd}")
        try:
            link = os.readlink(f"/proc/{pid}/fd/{state.remote_fd}")
            info = fdinfo.read_bytes()
        except OSError as exc:
            raise TrackerLost(
                pid, f"fd {state.remote_fd} is gone from the target", exc.errno or 0
            ) from exc
        api = _FDINFO_API.search(info)
        if (
            link != "anon_inode:[userfaultfd]"
            or api is None
            or int(api.group(2), 16) & FEATURES != FEATURES
        ):
            raise TrackerLost(pid, f"fd {state.remote_fd} is not the tracker's userfaultfd")
        local = session.pidfd_getfd(state.remote_fd)
        try:
            if os.fstat(local).st_ino != state.inode:
                raise TrackerLost(pid, f"fd {state.remote_fd} is another userfaultfd")
            return cls(
                session,
                local_fd=local,
                remote_fd=state.remote_fd,
                registered=state.registered,
                fresh=state.fresh,
                start_time=state.start_time,
            )
        except BaseException:
            os.close(local)
            raise

    @classmethod
    def _adopt(cls, session: Process, state: TrackerState, fd: int) -> UffdWpTracker:
        """A tracker on ``fd``, a userfaultfd of this process that must be ``state``'s."""
        pid = session.pid
        try:
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
                info = Path(f"/proc/self/fdinfo/{fd}").read_bytes()
            except OSError as exc:
                raise TrackerLost(pid, f"descriptor {fd} is not open", exc.errno or 0) from exc
            api = _FDINFO_API.search(info)
            if (
                link != "anon_inode:[userfaultfd]"
                or api is None
                or int(api.group(2), 16) & FEATURES != FEATURES
            ):
                raise TrackerLost(pid, "the descriptor given is not a tracker's userfaultfd")
            if os.fstat(fd).st_ino != state.inode:
                raise TrackerLost(pid, "the descriptor given is another userfaultfd")
            return cls(
                session,
                local_fd=fd,
                remote_fd=-1,
                registered=state.registered,
                fresh=state.fresh,
                start_time=state.start_time,
            )
        except BaseException:
            os.close(fd)
            raise

    def hand_over(self) -> tuple[TrackerState, int]:
        """Like :meth:`release`, but the userfaultfd is given to the caller instead of being
        closed: (state, descriptor). Tracking goes on while some copy of it is open."""
        self._check_open()
        state = self.state()
        os.close(self._pagemap)
        self._done = True
        return state, self.local_fd

    # -- the interface ---------------------------------------------------------------------

    def state(self) -> TrackerState:
        return TrackerState(
            backend=self.backend_name,
            pid=self.pid,
            start_time=self.start_time,
            remote_fd=self.remote_fd,
            inode=self.inode,
            registered=tuple(self._registered),
            fresh=tuple(self._fresh),
        )

    @property
    def registered(self) -> list[Range]:
        """The ranges registered with the userfaultfd (as of the last scan or reset)."""
        return list(self._registered)

    def dirty_pages(self, ranges: Iterable[Range] | None = None) -> PageArray:
        self._check_open()
        wanted = normalise(ranges)
        tracked, written = self._refresh(wanted)
        return self._with_fresh(tracked, written, wanted)

    def dirty_pages_later(self) -> Pending[PageArray]:
        """The scans run on a worker thread (the ioctl releases the GIL): the layout is read
        here, the returned object's ``result()`` registers what is new and adds the fresh
        ranges, on the caller's thread."""
        self._check_open()
        self._join()
        layout = self._layout(None)
        future = worker("scan").submit(self._scan, layout[3], written=True)
        self._pending = future

        def finish() -> PageArray:
            try:
                unregistered, found = future.result()
            finally:
                self._pending = None
            tracked, written = self._settle(layout, unregistered, found, None)
            return self._with_fresh(tracked, written, None)

        return Pending(finish, future)

    def _with_fresh(
        self, tracked: list[Range], written: PageArray, wanted: list[Range] | None
    ) -> PageArray:
        fresh = intersect(self._fresh, tracked)
        if wanted is not None:
            fresh = intersect(fresh, wanted)
        if not fresh:
            return written
        return union(written, pages_in(fresh))

    def reset(self) -> None:
        self._check_open()
        self._join()
        if self._refreshed != (self.session, self.session.layout_epoch):
            self._refresh(None, written=False)
        fresh = intersect(self._fresh, self._registered)
        old = subtract(self._registered, fresh)
        try:
            for start, end in old:
                self._scanner.scan(
                    start,
                    end,
                    flags=_uffd.PM_SCAN_WP_MATCHING | _uffd.PM_SCAN_CHECK_WPASYNC,
                    category_mask=WRITTEN,
                    return_mask=WRITTEN,
                )
            for start, end in fresh:
                _uffd.uffd_writeprotect(self.local_fd, start, end - start)
        except OSError as exc:
            raise _os_error(self.pid, "uffd-wp reset", exc) from exc
        self._fresh = []

    # -- internals -------------------------------------------------------------------------

    def _join(self) -> None:
        """Wait for a scan still running on the worker (the scanner's buffer is shared)."""
        pending = self._pending
        if pending is not None:
            concurrent.futures.wait((pending,))

    def _refresh(
        self, wanted: list[Range] | None, *, written: bool = True
    ) -> tuple[list[Range], PageArray]:
        """Register what is not yet registered; scan for written pages inside ``wanted``.

        Returns (tracked ranges, written pages of registered memory). Two ``PAGEMAP_SCAN``
        per span: the first finds what sits in a mapping without write-protection enabled
        (``PAGE_IS_WPALLOWED`` inverted), which the kernel answers per mapping without
        walking the page tables of registered ones; the second (skipped without ``written``)
        asks for written pages in the rest and nothing else, the one query the kernel has a
        fast path for (``pagemap_scan_pmd_entry``: a 1 GiB range in 0.30 ms here, against
        0.71 ms for one query asking both questions, on 2026-12-04; bench/bench_tracking.py
        times the bare fast-path query).
        """
        layout = self._layout(wanted)
        unregistered, found = self._scan(layout[3], written=written)
        return self._settle(layout, unregistered, found, wanted)

    def _layout(self, wanted: list[Range] | None) -> _Layout:
        """(maps, writable ranges, tracked ranges, the ranges to scan)."""
        maps = self.session.maps()
        writable, private = tracked_ranges(maps)
        # Registered ranges stay tracked while mapped, even after an mprotect to read-only.
        tracked = merge([*writable, *intersect(self._registered, private)])
        scan = tracked if wanted is None else intersect(tracked, wanted)
        return maps, writable, tracked, scan

    def _scan(self, scan: list[Range], *, written: bool) -> tuple[list[Range], list[PageArray]]:
        """(unregistered ranges, written pages) of ``scan``: ioctls and numpy only, so that
        it may run on the worker thread."""
        unregistered: list[Range] = []
        found: list[PageArray] = []
        try:
            for start, end in scan:
                regions = self._scanner.scan(
                    start,
                    end,
                    category_mask=WPALLOWED,
                    category_inverted=WPALLOWED,
                    return_mask=WPALLOWED,
                )
                unregistered.extend((int(s), int(e)) for s, e, _ in regions.tolist())
            if written:
                for start, end in subtract(scan, merge(unregistered)):
                    regions = self._scanner.scan(
                        start, end, category_mask=WRITTEN, return_mask=WRITTEN
                    )
                    if len(regions):
                        found.append(_uffd.regions_to_pages(regions))
        except OSError as exc:
            raise _os_error(self.pid, "uffd-wp scan", exc) from exc
        return unregistered, found

    def _settle(
        self,
        layout: _Layout,
        unregistered: list[Range],
        found: list[PageArray],
        wanted: list[Range] | None,
    ) -> tuple[list[Range], PageArray]:
        maps, writable, tracked, _ = layout
        # With ``wanted`` given, ranges outside it are checked at the next full refresh (every
        # reset does one); a range that appears meanwhile is still counted from then on.
        unregistered = merge(unregistered)
        failed: list[Range] = []
        for piece in intersect(unregistered, writable):
            failed.extend(self._register(piece, maps))
        # Unregistered memory changed under the tracker (new, regrown or replaced mapping):
        # written in full until the next reset.
        self._fresh = merge([*intersect(self._fresh, tracked), *unregistered])
        self._registered = subtract(tracked, merge([*failed, *subtract(unregistered, writable)]))
        pages = np.concatenate(found) if found else np.zeros(0, dtype=np.uint64)
        # Only a full refresh (every tracked range scanned) stands in for the reset's own.
        self._refreshed = (self.session, self.session.layout_epoch) if wanted is None else None
        return tracked, pages

    def _register(self, piece: Range, maps: Sequence[Mapping]) -> list[Range]:
        """Register ``piece``; returns the parts that could not be registered.

        A range over several mappings fails as a whole if one of them is refused (``EBUSY``:
        the target's own userfaultfd has it; ``EINVAL``: a kind of mapping userfaultfd does
        not take), so on failure each mapping is tried alone. What stays unregistered counts
        as written at every scan.
        """
        start, end = piece
        try:
            _uffd.uffd_register(self.local_fd, start, end - start)
        except OSError:
            pass
        else:
            return []
        failed: list[Range] = []
        for m in maps:
            part_start, part_end = max(start, m.start), min(end, m.end)
            if part_start >= part_end:
                continue
            try:
                _uffd.uffd_register(self.local_fd, part_start, part_end - part_start)
            except OSError:
                failed.append((part_start, part_end))
        return failed

    def _release_local(self) -> None:
        os.close(self._pagemap)
        os.close(self.local_fd)

    def _stop(self) -> None:
        """Unregister everything (drops the protection too) and close the target's fd."""
        _, private = tracked_ranges(self.session.maps())
        for start, end in intersect(self._registered, private):
            with contextlib.suppress(OSError):
                _uffd.uffd_unregister(self.local_fd, start, end - start)
        if self.remote_fd < 0:
            return  # held outside the target: closing this process's copy ends it
        try:
            self.session.close(self.remote_fd)
        except InjectorError as exc:
            raise TrackingError(
                self.pid, f"close({self.remote_fd}) in the target failed", exc.errno or 0
            ) from exc
