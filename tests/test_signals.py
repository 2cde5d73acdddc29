"""The signal part: ``applier dump`` records the signal state CRIU 4.2 keeps in the cores
(sigactions, blocked masks, itimers, pending queues), and ``apply`` puts dispositions and
blocked masks back (``Part.SIGNALS``), reports pending signals, and still applies images
that hold no signal state. Real processes (tests/targets/sig_target.c), crit as the
independent decoder, the CRIU 4.2 golden dump as the reference structure."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from applier.api import apply, diff
from applier.capture import region_from_mapping
from applier.dump import dump
from applier.errors import ApplyFailed
from applier.executor import Executor
from applier.model import Sigaction
from applier.plan import Plan, SetSigactions, SetSigmask, Unmap
from applier.undo.log import UndoLog
from formats import names
from formats.core import CoreEntry
from formats.imagedir import ImageDir
from formats.imagefile import dump_image, load_image
from formats.signals import SA_RESTART, SA_RESTORER, SA_SIGINFO, signals_to_sigset
from injector.signals import read_signals
from injector.testing import PAGE, FakeProcess
from tests.conftest import DATA
from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGPIPE = 1, 2, 3, 10, 12, 13
SIGALRM, SIGTERM, SIGWINCH = 14, 15, 28
MAIN_MASK = signals_to_sigset([SIGWINCH, SIGALRM])
WORKER_MASK = signals_to_sigset([SIGWINCH, SIGALRM, SIGTERM, SIGHUP])


@pytest.fixture
def target() -> Iterator[Target]:
    with spawn(build_c("sig_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t


def _ask(t: Target, cmd: str, key: str) -> list[str]:
    t.send(cmd)
    words = t.expect(key)
    t.wait_in_syscall(0)
    return words


def _handlers(t: Target) -> tuple[int, int, int]:
    a, b, c = (int(w, 16) for w in _ask(t, "info", "info"))
    return a, b, c


def _masks(t: Target) -> tuple[int, int]:
    main, worker = (int(w, 16) for w in _ask(t, "masks", "masks"))
    return main, worker


def _worker(t: Target) -> int:
    (tid,) = (int(p.name) for p in Path(f"/proc/{t.pid}/task").iterdir() if int(p.name) != t.pid)
    return tid


def _num(value: int | str) -> int:
    """A crit number: an int, or a "0x..." string (crit prints some fields in hex)."""
    return value if isinstance(value, int) else int(value, 0)


def _crit(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["crit", "decode", "-i", str(path)], check=True, capture_output=True, text=True
    )
    entry: dict[str, Any] = json.loads(out.stdout)["entries"][0]
    return entry


def test_dump_records_the_signal_state_as_criu_does(target: Target, tmp_path: Path) -> None:
    """Sigactions, both threads' blocked masks, ITIMER_REAL and the (empty) queues, field
    for field as the target set them, where CRIU 4.2 keeps them (crit agrees)."""
    on_usr1, _, on_usr2 = _handlers(target)
    worker = _worker(target)
    image = tmp_path / "ck"
    dump(target.pid, image)
    with ImageDir.open(image) as img:
        leader, other = img.core(target.pid), img.core(worker)
    tc = leader.tc
    assert tc is not None and len(tc.sigactions) == 62
    usr1, usr2, pipe = (tc.sigaction_for(s) for s in (SIGUSR1, SIGUSR2, SIGPIPE))
    assert usr1.sigaction == on_usr1 and usr1.mask == 0
    assert usr1.flags == SA_RESTART | SA_RESTORER and usr1.restorer != 0
    assert usr2.sigaction == on_usr2 and usr2.flags == SA_SIGINFO | SA_RESTORER
    assert usr2.mask == signals_to_sigset([SIGINT]) and usr2.restorer == usr1.restorer
    assert pipe.sigaction == 1  # SIG_IGN
    assert tc.sigaction_for(SIGQUIT).sigaction == 0
    assert all(e.compat_sigaction is False for e in tc.sigactions)
    assert tc.blk_sigset == MAIN_MASK
    assert leader.thread_core is not None and leader.thread_core.blk_sigset is None
    assert other.thread_core is not None and other.thread_core.blk_sigset == WORKER_MASK
    assert other.tc is None
    timers = tc.timers
    assert timers is not None
    assert (timers.real.isec, timers.real.iusec) == (3, 0)
    assert 290 <= timers.real.vsec < 300  # value 300 s, a moment ago
    assert (timers.virt.vsec, timers.virt.vusec, timers.prof.vsec) == (0, 0, 0)
    assert tc.signals_s is not None and tc.signals_s.signals == []
    assert other.thread_core.signals_p is not None and other.thread_core.signals_p.signals == []

    # crit decodes them the same way, in the structure of the real CRIU 4.2 dump
    gold = DATA / "state-criu-4.2-crit-json"
    ours_l, ours_w = _crit(image / names.core(target.pid)), _crit(image / names.core(worker))
    gold_l = json.loads((gold / "core-4524.img.json").read_text())["entries"][0]
    gold_w = json.loads((gold / "core-4526.img.json").read_text())["entries"][0]
    for key in ("blk_sigset", "timers", "sigactions", "signals_s"):
        assert key in ours_l["tc"] and key in gold_l["tc"]
    assert len(ours_l["tc"]["sigactions"]) == len(gold_l["tc"]["sigactions"]) == 62
    assert set(ours_l["tc"]["sigactions"][0]) == set(gold_l["tc"]["sigactions"][0])
    assert set(ours_l["tc"]["timers"]) == set(gold_l["tc"]["timers"]) == {"real", "virt", "prof"}
    assert set(ours_l["tc"]["timers"]["real"]) == set(gold_l["tc"]["timers"]["real"])
    for ours, theirs in ((ours_l, gold_l), (ours_w, gold_w)):
        has = "blk_sigset" in ours["thread_core"]
        assert has == ("blk_sigset" in theirs["thread_core"])
        assert "signals_p" in ours["thread_core"] and "signals_p" in theirs["thread_core"]
    assert "tc" not in ours_w and "tc" not in gold_w
    assert _num(ours_l["tc"]["blk_sigset"]) == MAIN_MASK
    assert _num(ours_w["thread_core"]["blk_sigset"]) == WORKER_MASK
    assert _num(ours_l["tc"]["sigactions"][SIGUSR1 - 2]["sigaction"]) == on_usr1  # no 9
    assert ours_l["tc"]["timers"]["real"]["isec"] == 3
    assert_untouched(target)


def test_apply_puts_a_changed_handler_and_masks_back(target: Target, tmp_path: Path) -> None:
    """A handler changed, a signal ignored and both threads' masks changed after the
    checkpoint: diff shows what it can see without injecting, apply restores all of it, and
    the old handler is the one that runs."""
    _, on_usr1b, _ = _handlers(target)
    worker = _worker(target)
    image = tmp_path / "ck"
    dump(target.pid, image)
    assert _masks(target) == (MAIN_MASK, WORKER_MASK)
    _ask(target, "change", "changed")
    changed = _masks(target)
    assert changed == (
        MAIN_MASK | signals_to_sigset([SIGUSR2]),
        (WORKER_MASK & ~signals_to_sigset([SIGTERM])) | signals_to_sigset([SIGUSR1]),
    )
    plan = diff(image, target.pid)
    masks = {s.tid: (s.old, s.new) for s in plan.of(SetSigmask)}
    assert masks == {target.pid: (changed[0], MAIN_MASK), worker: (changed[1], WORKER_MASK)}
    (acts,) = plan.of(SetSigactions)
    assert [(sig, old) for sig, old, _ in acts.actions] == [(SIGQUIT, None)]  # IGN now, DFL
    assert any("handler now and in the image" in n for n in plan.notes)

    result = apply(image, target.pid)
    assert result.stats.verified and result.stats.sigmasks == 2
    (done,) = result.plan.of(SetSigactions)
    olds = {sig: old for sig, old, _ in done.actions if old is not None}
    assert set(olds) == {SIGQUIT, SIGUSR1}  # the apply read both exactly
    assert olds[SIGUSR1].handler == on_usr1b and olds[SIGQUIT].kind == "ignore"
    assert_untouched(target)
    assert _masks(target) == (MAIN_MASK, WORKER_MASK)
    state = read_signals(target.pid)
    assert not state.leader.ignored >> (SIGQUIT - 1) & 1
    assert _ask(target, "raise", "counts") == ["1", "0"]  # on_usr1 ran, not on_usr1b
    assert _ask(target, "raise", "counts") == ["2", "0"]
    after = diff(image, target.pid)
    assert not after.of(SetSigactions) and not after.of(SetSigmask)


def test_cli_restores_signals_alone_and_shows_them(target: Target, tmp_path: Path) -> None:
    """--restore signals: only dispositions and masks go back (memory is left: the counters
    keep their values); --dry-run and --json show the steps."""
    image = tmp_path / "ck"
    assert run_applier("dump", str(image), "--from", str(target.pid)).returncode == 0
    _ask(target, "change", "changed")
    assert _ask(target, "raise", "counts") == ["0", "1"]  # the new handler
    dry = run_applier("apply", str(image), "--into", str(target.pid), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"sigmask thread {target.pid} {{SIGUSR2,SIGALRM,SIGWINCH}} -> " in dry.stdout
    assert "sigaction SIGQUIT SIG_IGN" not in dry.stdout  # read-only: the old one is unknown
    assert "sigaction SIGQUIT ? -> SIG_DFL" in dry.stdout
    js = run_applier("apply", str(image), "--into", str(target.pid), "--dry-run", "--json")
    doc = json.loads(js.stdout)
    ops = [s["op"] for s in doc["steps"]]
    assert ops.count("sigmask") == 2 and ops.count("sigaction") == 1
    assert doc["summary"]["sigmasks"] == 2
    out = run_applier("apply", str(image), "--into", str(target.pid), "--restore", "signals")
    assert out.returncode == 0, out.stderr
    assert "2 signal dispositions, 2 blocked masks" in out.stdout
    assert "0 pages written" in out.stdout
    assert_untouched(target)
    assert _ask(target, "raise", "counts") == ["1", "1"]  # the old handler, memory as it was
    assert _masks(target) == (MAIN_MASK, WORKER_MASK)
    again = run_applier("diff", str(image), "--against", str(target.pid), "--restore", "signals")
    assert again.returncode == 0, again.stdout


def test_pending_signals_are_reported_not_raised(target: Target, tmp_path: Path) -> None:
    """A signal pending at the checkpoint is in the image (signals_p) and named in the plan;
    the apply does not raise it again: nothing is queued that was not there."""
    _ask(target, "pend", "pending")
    image = tmp_path / "ck"
    dump(target.pid, image)
    with ImageDir.open(image) as img:
        th = img.core(target.pid).thread_core
    assert th is not None and th.signals_p is not None
    assert [q.si_signo for q in th.signals_p.signals] == [SIGUSR2]
    assert read_signals(target.pid).leader.pending == signals_to_sigset([SIGUSR2])
    result = apply(image, target.pid)
    assert any(
        n.startswith(f"SIGUSR2 (si_code -6) was pending for thread {target.pid}")
        for n in result.plan.notes
    )
    assert read_signals(target.pid).leader.pending == signals_to_sigset([SIGUSR2])
    assert_untouched(target)


def test_image_without_signal_state_still_applies(target: Target, tmp_path: Path) -> None:
    """An image whose cores hold no sigactions (older dumps): everything else is applied,
    the live handlers and masks are left as they are, and a note says so."""
    image = tmp_path / "ck"
    dump(target.pid, image)
    core = image / names.core(target.pid)
    magic, entries = load_image(core)
    entry: CoreEntry = entries[0]
    assert entry.tc is not None
    entry.tc.sigactions = []
    dump_image(core, magic, [entry])
    _ask(target, "change", "changed")
    result = apply(image, target.pid)
    assert not result.plan.of(SetSigactions) and not result.plan.of(SetSigmask)
    assert any("no signal state" in n for n in result.plan.notes)
    assert _masks(target)[0] == MAIN_MASK | signals_to_sigset([SIGUSR2])
    assert _ask(target, "raise", "counts") == ["0", "1"]  # still the new handler
    assert_untouched(target)


def test_handler_outside_the_images_code_is_refused(target: Target, tmp_path: Path) -> None:
    """A saved handler that is not in executable memory of the image: exit 4 before
    anything is written; the target is as it was."""
    image = tmp_path / "ck"
    dump(target.pid, image)
    core = image / names.core(target.pid)
    magic, entries = load_image(core)
    entries[0].tc.sigaction_for(SIGUSR2).sigaction = 0x1000
    dump_image(core, magic, entries)
    _ask(target, "change", "changed")
    out = run_applier("apply", str(image), "--into", str(target.pid))
    assert out.returncode == 4 and out.stderr.count("\n") == 1
    assert "SIGUSR2: the image's handler 0x1000 is not in executable memory" in out.stderr
    assert_untouched(target)
    assert _ask(target, "raise", "counts") == ["0", "1"]
    shutil.rmtree(image)


@pytest.mark.parametrize("fail_at", ["rt_sigaction", "munmap"])
def test_rollback_puts_dispositions_and_masks_back(fail_at: str) -> None:
    """On a fake: a failure in the sigaction step or in a later step leaves the handler
    table and the mask as they were."""
    f = FakeProcess(4242, tids=[4242, 4243])
    f.map_anon(0x7F0000000000, 2)
    f.actions = {SIGUSR1: (0x400100, SA_RESTORER, 0x400200, 0), SIGQUIT: (1, 0, 0, 0)}
    f.sigmasks = {4242: 0x2000, 4243: 0}
    before = (dict(f.actions), dict(f.sigmasks))
    new = Sigaction(0x400300, SA_RESTORER | SA_RESTART, 0x400200, 2)
    steps = (
        SetSigactions(((SIGUSR1, Sigaction(*f.actions[SIGUSR1]), new),)),
        SetSigmask(4243, 4243, 0, 0x4000),
        _unmap(f),
    )
    plan = Plan(4242, 4242, PAGE, steps, ())
    # rt_sigaction: the set goes through, its read-back fails; munmap: the step after
    f.fail[fail_at] = (0 if fail_at == "munmap" else 1, 22)
    with pytest.raises(ApplyFailed):
        Executor(f, plan, {}, UndoLog.create()).run()
    assert (f.actions, f.sigmasks) == before


def _unmap(f: FakeProcess) -> Unmap:
    (m,) = [m for m in f.maps() if m.start == 0x7F0000000000]
    return Unmap(region_from_mapping(m))
