"""``applier demo``: checkpoint a running demo server, let it change, revert it in place.

Needs gcc (the demo target is compiled on first use) and root or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from applier.api import apply
from applier.dump import dump
from applier.errors import UsageError

__all__ = ["run"]

SOURCE = Path(__file__).parent / "counter.c"


def _build() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "applier"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache / f"demo-counter-{digest}"
    if not binary.exists():
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise UsageError("the demo needs a C compiler (apt-get install gcc)")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(f".{os.getpid()}")
        subprocess.run([gcc, "-O1", "-o", str(tmp), str(SOURCE)], check=True)
        tmp.rename(binary)
    return binary


class _Target:
    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )
        self.readline()  # "ready <pid>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float = 5.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"demo target {self.pid} did not answer")
        return self.proc.stdout.readline().decode().strip()

    def state(self) -> dict[str, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"state\n")
        self.proc.stdin.flush()
        words = self.readline().split()[1:]
        return dict(w.split("=", 1) for w in words)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


def _show(label: str, state: dict[str, str]) -> None:
    print(
        f"  {label:<22} counter={state['counter']:>4}  journal={state['journal']:>6} bytes  "
        f"blocks={state['blocks']:>3}  checksum={state['checksum']}"
    )


def run(args: argparse.Namespace) -> int:
    target = _Target(_build())
    workdir = Path(tempfile.mkdtemp(prefix="applier-demo-"))
    try:
        print(f"demo target running as pid {target.pid} (counts, journals, maps memory)")
        time.sleep(args.warmup)
        before = target.state()
        stats = dump(target.pid, workdir / "checkpoint")
        _show("at checkpoint:", before)
        print(
            f"  checkpoint written to {workdir / 'checkpoint'}: {stats.pages} pages, "
            f"{stats.vmas} VMAs, {stats.seconds * 1000:.1f} ms"
        )
        time.sleep(args.run)
        changed = target.state()
        _show(f"{args.run:.1f} s later:", changed)
        result = apply(workdir / "checkpoint", target.pid)
        st = result.stats
        print(
            f"  applier apply: {st.pages_written} pages written, "
            f"{st.bytes_discarded // result.plan.page_size} discarded, "
            f"{st.layout_changes} layout changes, {st.threads} thread(s), "
            f"{st.seconds * 1000:.1f} ms, verified"
        )
        after = target.state()
        _show("after apply:", after)
        time.sleep(0.35)
        _show("and it runs on:", target.state())
        same = all(after[k] == before[k] for k in ("counter", "journal", "blocks", "checksum"))
        if same:
            print(f"reverted: pid {target.pid} is back at its checkpoint, same pid, still running")
            return 0
        print("NOT reverted: the state after apply differs from the checkpoint")
        return 8
    finally:
        target.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
