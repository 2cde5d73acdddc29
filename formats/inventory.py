"""``inventory.img``, ``ids-<pid>.img`` and ``pstree.img`` messages (CRIU images/inventory.proto,
core.proto ``task_kobj_ids_entry``, pstree.proto)."""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.pb import Kind, Message, optional, repeated, required

__all__ = [
    "CRTOOLS_IMAGES_V1",
    "CRTOOLS_IMAGES_V1_1",
    "InventoryEntry",
    "PluginsEntry",
    "PstreeEntry",
    "TaskKobjIdsEntry",
]

CRTOOLS_IMAGES_V1 = 1  # pre-1.6: no common magic in any image
CRTOOLS_IMAGES_V1_1 = 2  # every real dump since CRIU 1.6

U32, U64, BOOL, ENUM, STR = Kind.UINT32, Kind.UINT64, Kind.BOOL, Kind.ENUM, Kind.STRING


@attrs.define(kw_only=True)
class TaskKobjIdsEntry(Message):
    """task_kobj_ids_entry: ids of a task's shared kernel objects and namespaces."""

    vm_id: int = required(1, U32)
    files_id: int = required(2, U32)
    fs_id: int = required(3, U32)
    sighand_id: int = required(4, U32)
    pid_ns_id: int | None = optional(5, U32)
    net_ns_id: int | None = optional(6, U32)
    ipc_ns_id: int | None = optional(7, U32)
    uts_ns_id: int | None = optional(8, U32)
    mnt_ns_id: int | None = optional(9, U32)
    user_ns_id: int | None = optional(10, U32)
    cgroup_ns_id: int | None = optional(11, U32)
    time_ns_id: int | None = optional(12, U32)


@attrs.define(kw_only=True)
class PluginsEntry(Message):
    """plugins_entry (CRIU 4.1+): names of the plugins used at dump time."""

    plugins: list[str] = repeated(12, STR)


@attrs.define(kw_only=True)
class InventoryEntry(Message):
    """inventory_entry: image format version and dump-wide settings."""

    img_version: int = required(1, U32)
    fdinfo_per_id: bool | None = optional(2, BOOL)
    root_ids: TaskKobjIdsEntry | None = optional(3, Kind.MESSAGE, message=TaskKobjIdsEntry)
    ns_per_id: bool | None = optional(4, BOOL)
    root_cg_set: int | None = optional(5, U32)
    lsmtype: int | None = optional(6, ENUM)
    dump_uptime: int | None = optional(8, U64)
    pre_dump_mode: int | None = optional(9, U32)
    tcp_close: bool | None = optional(10, BOOL)
    network_lock_method: int | None = optional(11, U32)
    plugins_entry: PluginsEntry | None = optional(12, Kind.MESSAGE, message=PluginsEntry)
    dump_criu_run_id: str | None = optional(13, STR)
    allow_uprobes: bool | None = optional(14, BOOL)


@attrs.define(kw_only=True)
class PstreeEntry(Message):
    """pstree_entry: one process, its parent, group, session and thread ids."""

    pid: int = required(1, U32)
    ppid: int = required(2, U32)
    pgid: int = required(3, U32)
    sid: int = required(4, U32)
    threads: list[int] = repeated(5, U32)
