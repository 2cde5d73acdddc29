"""Dirty tracking of real processes: each available backend reports exactly what was written."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import pytest

from injector.session import attach
from injector.tracking import (
    DirtyTracker,
    TrackerLost,
    TrackerState,
    TrackerUnavailable,
    TrackingError,
    UffdWpTracker,
    open_tracker,
    probe_backends,
    resume_tracker,
)
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

PAGE = 4096
ALL = ("uffd-wp", "soft-dirty", "content")
RESUMABLE = ("uffd-wp", "soft-dirty")


@pytest.fixture
def target() -> Iterator[Target]:
    """A running track_writer; it must be running and untraced when the test is over."""
    with spawn(build_c("track_writer.c")) as t:
        t.expect("ready")
        yield t
        assert_untouched(t)


def _skip_unless_available(backend: str) -> None:
    reason = probe_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable here: {reason}")


def _cmd(t: Target, line: str, reply: str = "ok") -> list[str]:
    t.send(line)
    return t.expect(reply)


def _map(t: Target, pages: int, populate: bool = True) -> int:
    addr = int(_cmd(t, f"map {pages}", "map")[0], 16)
    if populate:
        _cmd(t, f"fill {addr:#x} {pages}")
    return addr


def _offsets(pages: np.ndarray, base: int) -> list[int]:
    return [(int(p) - base) // PAGE for p in pages]


def _open(t: Target, backend: str) -> tuple[DirtyTracker, TrackerState | None]:
    """Open a tracker in one session; release it if it can outlive the session."""
    with attach(t.pid) as s:
        tracker = open_tracker(s, backend)
        assert tracker.backend_name == backend
        if backend in RESUMABLE:
            return tracker, tracker.release()
    return tracker, None


def _uffd_fds(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [fd.name for fd in fds.iterdir() if os.readlink(fd) == "anon_inode:[userfaultfd]"]


@pytest.mark.parametrize("backend", ALL)
def test_exact_pages_of_a_write_pattern(target: Target, backend: str) -> None:
    """CPU writes and a kernel read() into the buffer are reported page-exactly."""
    _skip_unless_available(backend)
    base = _map(target, 64)
    region = [(base, base + 64 * PAGE)]
    with attach(target.pid) as s:
        tracker = open_tracker(s, backend)
        assert tracker.dirty_pages(region).tolist() == []
        # the process is stopped: nothing at all may be written in between
        assert tracker.dirty_pages().tolist() == []
        state = tracker.release() if backend in RESUMABLE else None
    assert_untouched(target)
    touched = [0, 3, 17, 40, 63]
    _cmd(target, "touch " + " ".join(f"{base + p * PAGE + 100:#x}" for p in touched))
    _cmd(target, f"pipe {base + 30 * PAGE + 4000:#x} 200")  # pages 30 and 31, by the kernel
    with attach(target.pid) as s:
        if state is None:
            tracker.rebind(s)  # the content copy stays in this process
        else:
            tracker = resume_tracker(s, state)
        assert _offsets(tracker.dirty_pages(region), base) == sorted([*touched, 30, 31])
        assert _offsets(tracker.dirty_pages([(base + 17 * PAGE, base + 31 * PAGE)]), base) == [
            17,
            30,
        ]
        tracker.reset()
        assert tracker.dirty_pages().tolist() == []
        tracker.close()


def test_content_ignores_rewrites_of_equal_bytes(target: Target) -> None:
    """The content backend reports changed bytes; writing the same bytes back is no change."""
    base = _map(target, 64)
    region = [(base, base + 64 * PAGE)]
    with attach(target.pid) as s:
        tracker = open_tracker(s, "content")
        for page in (1, 2, 50):
            s.write(base + page * PAGE + 9, b"\x07")
        s.write(base + 60 * PAGE, s.read(base + 60 * PAGE, 16))
        assert _offsets(tracker.dirty_pages(region), base) == [1, 2, 50]
        with pytest.raises(TrackingError):
            tracker.release()
        tracker.close()


@pytest.mark.parametrize("backend", RESUMABLE)
def test_mappings_created_after_tracking_began(target: Target, backend: str) -> None:
    """New mmap and brk growth are written in full, then tracked page-exactly after a reset."""
    _skip_unless_available(backend)
    _, state = _open(target, backend)
    assert state is not None
    old, new = (int(x, 16) for x in _cmd(target, "brk 4", "brk"))
    fresh = _map(target, 3, populate=False)
    heap = [(old, new)]
    mapped = [(fresh, fresh + 3 * PAGE)]
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        assert _offsets(tracker.dirty_pages(heap), old) == [0, 1, 2, 3]
        assert _offsets(tracker.dirty_pages(mapped), fresh) == [0, 1, 2]
        tracker.reset()
        assert tracker.dirty_pages().tolist() == []
        state = tracker.release()
    _cmd(target, f"touch {old + 2 * PAGE:#x} {fresh + PAGE:#x}")
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        assert _offsets(tracker.dirty_pages(heap), old) == [2]
        assert _offsets(tracker.dirty_pages(mapped), fresh) == [1]
        tracker.close()


def test_uffd_replaced_moved_and_dropped_memory(target: Target) -> None:
    """munmap+mmap at the same place, a moved mremap and MADV_DONTNEED all count as written."""
    _skip_unless_available("uffd-wp")
    a = _map(target, 8)
    b = _map(target, 8)
    c = _map(target, 8)
    _, state = _open(target, "uffd-wp")
    assert state is not None
    _cmd(target, f"remap {a:#x} 8")
    moved = int(_cmd(target, f"mremap {b:#x} 8 16", "mremap")[0], 16)
    _cmd(target, f"madv {c + 2 * PAGE:#x} 2")
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        assert _offsets(tracker.dirty_pages([(a, a + 8 * PAGE)]), a) == list(range(8))
        assert _offsets(tracker.dirty_pages([(moved, moved + 16 * PAGE)]), moved) == list(range(16))
        assert _offsets(tracker.dirty_pages([(c, c + 8 * PAGE)]), c) == [2, 3]
        tracker.reset()
        assert tracker.dirty_pages().tolist() == []
        tracker.close()


def test_uffd_pages_found_on_the_worker_equal_those_found_here(target: Target) -> None:
    """``dirty_pages_later`` (the scans on a worker thread while this one reads the target)
    finds what ``dirty_pages`` finds, a mapping made since (fresh, written in full) included,
    and registers that mapping just the same: after a reset neither reports anything."""
    _skip_unless_available("uffd-wp")
    base = _map(target, 64)
    _, state = _open(target, "uffd-wp")
    assert state is not None
    _cmd(target, "touch " + " ".join(f"{base + p * PAGE:#x}" for p in (1, 9, 33)))
    fresh = _map(target, 4)  # mapped after tracking began
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        pending = tracker.dirty_pages_later()
        assert s.get_regs(target.pid).ip  # the session goes on meanwhile
        later = pending.result()
        assert _offsets(later[(later >= base) & (later < base + 64 * PAGE)], base) == [1, 9, 33]
        assert _offsets(later[(later >= fresh) & (later < fresh + 4 * PAGE)], fresh) == [0, 1, 2, 3]
        assert np.array_equal(later, tracker.dirty_pages())
        tracker.reset()
        assert tracker.dirty_pages_later().result().tolist() == []
        state = tracker.release()
    _cmd(target, f"touch {fresh + 2 * PAGE:#x}")
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        later = tracker.dirty_pages_later().result()
        assert _offsets(later[(later >= fresh) & (later < fresh + 4 * PAGE)], fresh) == [2]
        tracker.close()


def test_uffd_tracer_writes_count_as_written(target: Target) -> None:
    """Pages written by the tracer itself are reported (reset after restoring pages)."""
    _skip_unless_available("uffd-wp")
    base = _map(target, 16)
    with attach(target.pid) as s:
        tracker = open_tracker(s, "uffd-wp")
        s.write(base + 5 * PAGE, b"x" * (PAGE + 1))
        assert _offsets(tracker.dirty_pages([(base, base + 16 * PAGE)]), base) == [5, 6]
        tracker.reset()
        assert tracker.dirty_pages().tolist() == []
        tracker.close()


def test_uffd_more_written_regions_than_one_scan_returns(target: Target) -> None:
    """3,000 scattered written pages (far past 512 regions) are each reported exactly once."""
    _skip_unless_available("uffd-wp")
    base = _map(target, 6000)
    _, state = _open(target, "uffd-wp")
    assert state is not None
    _cmd(target, f"stride {base:#x} 3000 2")
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        pages = tracker.dirty_pages([(base, base + 6000 * PAGE)])
        assert _offsets(pages, base) == list(range(0, 6000, 2))
        tracker.close()


@pytest.mark.parametrize("backend", RESUMABLE)
def test_reset_then_no_writes_is_empty(target: Target, backend: str) -> None:
    """After a reset and no writes by the region's owner, nothing is reported there."""
    _skip_unless_available(backend)
    base = _map(target, 32)
    region = [(base, base + 32 * PAGE)]
    _, state = _open(target, backend)
    assert state is not None
    _cmd(target, f"stride {base:#x} 8 4")
    with attach(target.pid) as s:
        tracker = resume_tracker(s, state)
        assert _offsets(tracker.dirty_pages(region), base) == list(range(0, 32, 4))
        tracker.reset()
        state = tracker.release()
    _cmd(target, "ping", "pong")  # the process runs, but writes nothing in the region
    with attach(target.pid) as s:
        tracker = resume_tracker(s, TrackerState.from_json(state.to_json()))
        assert tracker.dirty_pages(region).tolist() == []
        tracker.close()


def test_uffd_close_leaves_nothing_in_the_target(target: Target) -> None:
    """close() unregisters, closes the target's userfaultfd, and the target keeps running."""
    _skip_unless_available("uffd-wp")
    base = _map(target, 4)
    before = _uffd_fds(target.pid)
    _, state = _open(target, "uffd-wp")
    assert state is not None
    assert _uffd_fds(target.pid) == [*before, str(state.remote_fd)]
    with attach(target.pid) as s:
        resume_tracker(s, state).close()
        assert not any("uw" in flags for flags in s.vm_flags().values())
    assert _uffd_fds(target.pid) == before
    _cmd(target, f"touch {base:#x}")  # a write into formerly protected memory still works
    _cmd(target, "ping", "pong")
    with attach(target.pid) as s, pytest.raises(TrackerLost):
        resume_tracker(s, state)


def test_uffd_resume_refuses_a_foreign_descriptor(target: Target) -> None:
    """A state whose fd number now names something else is refused, not trusted."""
    _skip_unless_available("uffd-wp")
    _, state = _open(target, "uffd-wp")
    assert state is not None
    with attach(target.pid) as s:
        with pytest.raises(TrackerLost):
            resume_tracker(s, attrs.evolve(state, remote_fd=0))
        with pytest.raises(TrackerLost):
            resume_tracker(s, attrs.evolve(state, inode=state.inode + 1))
        with pytest.raises(TrackerLost):
            resume_tracker(s, attrs.evolve(state, start_time=1))
        resume_tracker(s, state).close()


def _measure_soft_dirty() -> bool:
    """Independently of the module: does bit 55 set after clear_refs=4 and a write?"""
    page = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    page[0] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    Path("/proc/self/clear_refs").write_text("4")
    page[0] = 2
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return bool(entry >> 55 & 1)


def test_soft_dirty_probe_matches_the_kernel(target: Target) -> None:
    """The probe's verdict equals a measurement; when absent, auto skips it with a reason."""
    reason = probe_backends()["soft-dirty"]
    assert (reason is None) == _measure_soft_dirty()
    with attach(target.pid) as s:
        tracker = open_tracker(s, "auto")
        try:
            if reason is not None:
                assert reason
                assert tracker.backend_name != "soft-dirty"
                with pytest.raises(TrackerUnavailable, match="soft-dirty"):
                    open_tracker(s, "soft-dirty")
            else:
                open_tracker(s, "soft-dirty").close()
        finally:
            tracker.close()


def test_auto_prefers_uffd_wp_when_it_works(target: Target) -> None:
    """auto picks the first available backend in preference order."""
    probes = probe_backends()
    expected = next(name for name in ALL if probes[name] is None)
    with attach(target.pid) as s:
        tracker = open_tracker(s)
        assert tracker.backend_name == expected
        tracker.close()
    assert set(probes) == set(ALL)
    assert probes["content"] is None


def test_uffd_memory_it_cannot_register_is_always_written(target: Target) -> None:
    """A mapping the target's own userfaultfd holds is written in full, every time; only it."""
    _skip_unless_available("uffd-wp")
    theirs = _map(target, 8)
    _cmd(target, f"ownuffd {theirs:#x} 8")
    expected = list(range(theirs, theirs + 8 * PAGE, PAGE))
    with attach(target.pid) as s:
        tracker = open_tracker(s, "uffd-wp")
        # stopped since the reset: the whole process shows nothing else, neighbours included
        assert tracker.dirty_pages().tolist() == expected
        tracker.reset()
        assert tracker.dirty_pages().tolist() == expected
        assert isinstance(tracker, UffdWpTracker)
        assert all(not (theirs <= a < theirs + 8 * PAGE) for a, _ in tracker.registered)
        tracker.close()
