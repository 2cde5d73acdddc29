"""Every file name of an image directory, in one place: CRIU's images (criu/image-desc.c,
format doc section 1) and the two sidecar files applier keeps beside them, which CRIU ignores.

Names take the id they are numbered by: a pid (``mm``, ``pagemap``, ``ids``, ``fs``), a
thread id (``core``), a pages id, a shmem id, a files id (``fdinfo``).
"""

from __future__ import annotations

__all__ = [
    "FILES",
    "INVENTORY",
    "MEMFD",
    "PARENT",
    "PIPES_DATA",
    "PSTREE",
    "TRACKING",
    "UNDO_SCOPE",
    "core",
    "fdinfo",
    "fs",
    "ids",
    "mm",
    "pagemap",
    "pagemap_shmem",
    "pages",
    "vmas",
]

INVENTORY = "inventory.img"
PSTREE = "pstree.img"
FILES = "files.img"
PIPES_DATA = "pipes-data.img"
MEMFD = "memfd.img"
PARENT = "parent"  # symlink to the parent snapshot of an incremental dump

# applier's sidecars (not CRIU images):
TRACKING = "applier-tracking.json"  # the dirty tracker a tracked dump left in the target
UNDO_SCOPE = "applier-undo.json"  # an undo image's scope: pid, parts, address ranges


def core(tid: int) -> str:
    return f"core-{tid}.img"


def mm(pid: int) -> str:
    return f"mm-{pid}.img"


def vmas(pid: int) -> str:
    """Legacy: the VMAs before they moved into mm_entry."""
    return f"vmas-{pid}.img"


def pagemap(pid: int) -> str:
    return f"pagemap-{pid}.img"


def pagemap_shmem(shmid: int) -> str:
    return f"pagemap-shmem-{shmid}.img"


def pages(pages_id: int) -> str:
    return f"pages-{pages_id}.img"


def ids(pid: int) -> str:
    return f"ids-{pid}.img"


def fs(pid: int) -> str:
    return f"fs-{pid}.img"


def fdinfo(files_id: int) -> str:
    return f"fdinfo-{files_id}.img"
