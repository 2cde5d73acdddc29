"""``applier check``: can apply and dirty tracking work on this machine, as this user?

Reports the kernel features the tracker needs (userfaultfd write-protection, PAGEMAP_SCAN,
soft-dirty), the ptrace permission (Yama, CAP_SYS_PTRACE, a live test on a forked child) and
the tracking backend ``dump --track`` would choose. Exit status: 0 apply and kernel dirty
tracking both work; 1 apply works, but ``--only-dirty`` can only compare page contents (no
kernel tracker); 5 apply cannot work here (ptrace refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from applier.errors import EXIT_DIFFERENT, EXIT_OK, EXIT_TARGET

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="report whether apply and dirty tracking can work here",
        description="Probe the kernel features and permissions applier needs. Exit status: "
        "0 apply and kernel dirty tracking work; 1 apply works but dirty tracking falls back "
        "to comparing contents; 5 apply cannot work (ptrace refused).",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _feature(why: str | None) -> str:
    return "yes" if why is None else f"no ({why})"


def report() -> dict[str, Any]:
    """The facts ``check`` prints, measured now."""
    from injector import probe  # noqa: PLC0415 - the CLI imports per command

    access = probe.probe_ptrace()
    backend, backends = probe.tracking_backend()
    kernel_tracking = backend != "content"
    return {
        "kernel": {
            "userfaultfd_wp": probe.probe_userfaultfd_wp(),
            "pagemap_scan": probe.probe_pagemap_scan(),
            "soft_dirty": backends["soft-dirty"],
        },
        "ptrace": {
            "works": access.works,
            "other_processes": access.others,
            "yama_ptrace_scope": access.yama_scope,
            "cap_sys_ptrace": access.cap_sys_ptrace,
            "cap_sys_admin": access.cap_sys_admin,
            "reason": access.reason,
        },
        "tracking": {"backend": backend, "unavailable": {k: v for k, v in backends.items() if v}},
        "apply": access.works,
        "kernel_tracking": kernel_tracking,
    }


def exit_status(doc: dict[str, Any]) -> int:
    if not doc["apply"]:
        return EXIT_TARGET
    return EXIT_OK if doc["kernel_tracking"] else EXIT_DIFFERENT


def run(args: argparse.Namespace) -> int:
    doc = report()
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return exit_status(doc)
    k, p, t = doc["kernel"], doc["ptrace"], doc["tracking"]
    scope = p["yama_ptrace_scope"]
    lines = [
        f"userfaultfd write-protect: {_feature(k['userfaultfd_wp'])}",
        f"PAGEMAP_SCAN:              {_feature(k['pagemap_scan'])}",
        f"soft-dirty:                {_feature(k['soft_dirty'])}",
        f"ptrace:                    {'works' if p['works'] else 'refused'}"
        + (f" ({p['reason']})" if p["reason"] else ""),
        f"  Yama ptrace_scope:       {'not present' if scope is None else scope}",
        f"  CAP_SYS_PTRACE:          {'yes' if p['cap_sys_ptrace'] else 'no'}",
        f"  other processes:         {'can be traced' if p['other_processes'] else 'no'}",
        f"  CAP_SYS_ADMIN:           {'yes' if p['cap_sys_admin'] else 'no'}"
        " (suspends a target's seccomp filter while injecting)",
        f"tracking backend:          {t['backend']}"
        + ("" if doc["kernel_tracking"] else " (no kernel tracker: --only-dirty compares pages)"),
    ]
    code = exit_status(doc)
    verdict = {
        EXIT_OK: "apply and dirty tracking work here",
        EXIT_DIFFERENT: "apply works here; dirty tracking falls back to comparing contents",
        EXIT_TARGET: "apply cannot work here: ptrace is refused",
    }[code]
    print("\n".join(lines))
    print(verdict)
    return code
