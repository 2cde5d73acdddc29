"""The descriptor planner (``applier.plan.fds``), pure: hand-made tables in, steps or a
refusal out; and the image side read from the golden CRIU 4.2 dumps."""

from __future__ import annotations

import json

import attrs
import pytest

from applier.errors import MismatchError
from applier.image import image_task
from applier.model import FdValue
from applier.parts import Part
from applier.plan import CloseFd, DupFd, Plan, ReopenFd, ResetFd, make_plan
from applier.plan.fds import plan_fds
from formats.imagedir import ImageDir
from tests.conftest import DATA
from tests.test_plan import image, live

O_RDWR, O_WRONLY, O_APPEND, O_NONBLOCK, O_LARGEFILE = 0o2, 0o1, 0o2000, 0o4000, 0o100000


def reg(fd: int, path: str, pos: int = 0, flags: int = O_RDWR, cloexec: bool = False) -> FdValue:
    return FdValue(fd, "REG", cloexec, flags, pos, path=path, mode=0o100644)


def pipe(fd: int, ino: int, flags: int = 0) -> FdValue:
    return FdValue(fd, "PIPE", False, flags, 0, ident=ino, what=f"pipe:[{ino}]")


def sock(fd: int, ino: int, kind: str = "INETSK") -> FdValue:
    return FdValue(fd, kind, True, O_RDWR, 0, ident=ino, what=f"socket:[{ino}]")


STDIO = [pipe(0, 10), pipe(1, 11, O_WRONLY), pipe(2, 12, O_WRONLY)]


def test_equal_tables_need_nothing() -> None:
    table = [*STDIO, reg(3, "/d", 5), sock(4, 77)]
    assert plan_fds(table, table) == []


def test_descriptors_opened_since_are_closed_and_unknown_kinds_left() -> None:
    notes: list[str] = []
    uffd = FdValue(6, "UND", True, O_RDWR, 0, what="anon_inode:[userfaultfd]")
    steps = plan_fds(STDIO, [*STDIO, sock(4, 77), reg(5, "/new"), uffd], notes=notes)
    assert steps == [CloseFd(sock(4, 77), 7), CloseFd(reg(5, "/new"), 7)]
    assert notes == [
        "fd 6 (anon_inode:[userfaultfd]): opened since the checkpoint, of a kind the image "
        "cannot record: left open"
    ]
    assert steps[0].describe() == "close   fd 4 (socket:[77]): opened since the checkpoint"


def test_same_file_gets_position_flags_and_cloexec_back() -> None:
    then = reg(3, "/d", 1234, O_RDWR | O_LARGEFILE, cloexec=True)
    now = reg(3, "/d", 40, O_RDWR | O_NONBLOCK | O_LARGEFILE, cloexec=False)
    (step,) = plan_fds([*STDIO, then], [*STDIO, now])
    assert step == ResetFd(
        3,
        "REG",
        "/d",
        pos=(40, 1234),
        flags=(O_RDWR | O_NONBLOCK | O_LARGEFILE, O_RDWR | O_LARGEFILE),
        cloexec=(False, True),
    )
    assert step.describe() == (
        "fd      3 (/d): position 40 -> 1234, flags O_NONBLOCK -> 0, close-on-exec off -> on"
    )
    # an unlinked file is the same file; flags F_SETFL cannot change do not count
    gone = attrs.evolve(then, deleted=True, flags=then.flags & ~O_LARGEFILE)
    assert plan_fds([then], [gone]) == []


def test_a_pipe_or_socket_gets_its_flags_back_not_a_position() -> None:
    (step,) = plan_fds([pipe(5, 9)], [attrs.evolve(pipe(5, 9, O_NONBLOCK), pos=3)])
    assert step == ResetFd(5, "PIPE", None, flags=(O_NONBLOCK, 0))


def test_closed_or_replaced_files_are_reopened() -> None:
    then = [*STDIO, reg(3, "/a", 10, cloexec=True), reg(4, "/b", 20, O_WRONLY | O_APPEND)]
    other = reg(4, "/other", 0, 0)
    steps = plan_fds(then, [*STDIO, other])
    assert steps == [
        ReopenFd(3, "/a", O_RDWR, 10, True, 5),
        ReopenFd(4, "/b", O_WRONLY | O_APPEND, 20, False, 5, replaces=other),
    ]
    assert steps[1].describe() == (
        "reopen  fd 4 (/b) O_WRONLY|O_APPEND at 20: replacing fd 4 (/other)"
    )
    # another access mode on the same path: reopened too
    (step,) = plan_fds([reg(3, "/a")], [reg(3, "/a", flags=0)])
    assert isinstance(step, ReopenFd)


def test_steps_run_closes_then_resets_then_reopens() -> None:
    then = [reg(3, "/a"), reg(4, "/b", 9)]
    now = [reg(4, "/b"), sock(5, 1)]
    assert [type(s) for s in plan_fds(then, now)] == [CloseFd, ResetFd, ReopenFd]


@pytest.mark.parametrize(
    ("then", "now", "message"),
    [
        (pipe(7, 300), None, "fd 7: the pipe 300 it held at the checkpoint was closed since"),
        (sock(7, 5, "UNIXSK"), None, "fd 7: the unix socket 5 it held at the checkpoint was"),
        (FdValue(7, "EVENTFD", False, 0, 0), None, "fd 7: the eventfd it held"),
        (sock(7, 5), sock(7, 6), "fd 7: the inet socket 5 it held at the checkpoint was "
         "replaced since by inet socket 6 and cannot be re-created"),
        (pipe(7, 300), reg(7, "/x"), "was replaced since by /x"),
    ],
)  # fmt: skip
def test_what_cannot_be_recreated_is_refused_unless_kept(
    then: FdValue, now: FdValue | None, message: str
) -> None:
    live_table = [*STDIO] + ([now] if now is not None else [])
    with pytest.raises(MismatchError, match=message) as info:
        plan_fds([*STDIO, then], live_table)
    assert str(info.value).endswith("--keep-fd 7 leaves it as it is")
    notes: list[str] = []
    assert plan_fds([*STDIO, then], live_table, keep={7}, notes=notes) == []
    assert notes == ["fd 7 left as it is (--keep-fd)"]


def test_kinds_not_restored_are_left_with_a_note() -> None:
    """A CRIU image's TTY (the terminal of an interactive process) is neither refused nor
    reopened."""
    notes: list[str] = []
    tty = FdValue(0, "TTY", False, O_RDWR, 0)
    assert plan_fds([tty], [reg(0, "/dev/pts/3")], notes=notes) == []
    assert plan_fds([tty], [], notes=notes) == []
    assert notes == ["fd 0: TTY in the image, a kind not restored: left as it is"] * 2


def test_a_socket_of_unknown_family_is_matched_by_inode() -> None:
    unknown = FdValue(4, "SOCKET", True, O_RDWR, 0, ident=77, what="socket:[77]")
    assert plan_fds([sock(4, 77, "UNIXSK")], [unknown]) == []
    with pytest.raises(MismatchError, match="replaced since"):
        plan_fds([sock(4, 77, "UNIXSK")], [attrs.evolve(unknown, ident=78)])


def _plan(fds_image: tuple[FdValue, ...] | None, fds_live: tuple[FdValue, ...] | None) -> Plan:
    return make_plan(attrs.evolve(image(), fds=fds_image), attrs.evolve(live(), fds=fds_live))


def test_make_plan_puts_descriptor_steps_after_layout_and_before_memory() -> None:
    plan = _plan((*STDIO,), (*STDIO, reg(3, "/new")))
    assert [s.op for s in plan.steps] == ["close-fd", "regs"]
    assert plan.summary()["fd_changes"] == 1
    assert plan.as_dict()["steps"][0] == {
        "op": "close-fd", "fd": 3, "kind": "REG", "path": "/new", "what": None,
    }  # fmt: skip
    left = make_plan(
        attrs.evolve(image(), fds=(*STDIO,)),
        attrs.evolve(live(), fds=(*STDIO, reg(3, "/new"))),
        Part.ALL & ~Part.FDS,
    )
    assert left.of(CloseFd) == []


def test_an_image_of_another_process_leaves_descriptors() -> None:
    """--other-process: the image's pipes and sockets are another process's."""
    plan = make_plan(
        attrs.evolve(image(), pid=200, fds=(*STDIO,)),
        attrs.evolve(live(), fds=(pipe(0, 99), reg(3, "/new"))),
        Part.FDS,
    )
    assert plan.steps == ()
    assert plan.notes == ("the image is of pid 200, not 100: descriptors left as they are",)


def test_images_without_descriptor_state_skip_the_part_with_a_note() -> None:
    plan = _plan(None, (*STDIO, reg(3, "/new")))
    assert plan.of(CloseFd) == []
    assert any(n.startswith("the image holds no descriptor state") for n in plan.notes)


def test_golden_images_descriptor_tables() -> None:
    """The golden CRIU 4.2 dumps' tables: basic-criu-4.2 ran on /dev/null with a pipe at 251;
    state-criu-4.2's is the one its info.txt describes."""
    basic = image_task(ImageDir.open(DATA / "basic-criu-4.2")).fds
    assert basic is not None
    assert [(v.fd, v.kind, v.path, v.flags & 3) for v in basic] == [
        (0, "REG", "/dev/null", 0), (1, "REG", "/dev/null", O_WRONLY),
        (2, "REG", "/dev/null", O_WRONLY), (10, "REG", "/dev/null", 0),
        (251, "PIPE", None, O_WRONLY),
    ]  # fmt: skip
    fds = {v.fd: v for v in image_task(ImageDir.open(DATA / "state-criu-4.2")).fds or ()}
    assert sorted(fds) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert (fds[3].path, fds[3].pos, fds[3].flags & 3) == (
        "/tmp/golden-state/work/data.txt", 1234, O_RDWR)  # fmt: skip
    assert (fds[4].flags & (O_APPEND | 3), fds[4].pos) == (O_APPEND | O_WRONLY, 6)
    assert (fds[5].path, fds[5].cloexec, fds[5].pos) == ("/etc/hostname", True, 3)
    assert fds[7].kind == fds[8].kind == "PIPE" and fds[7].ident == fds[8].ident
    assert (fds[9].kind, fds[11].kind, fds[12].kind) == ("UNIXSK", "INETSK", "EVENTFD")
    assert (fds[13].kind, fds[14].kind, fds[15].kind) == ("EVENTPOLL", "SIGNALFD", "TIMERFD")


def test_json_of_reset_and_reopen() -> None:
    then = [reg(3, "/a", 10, O_RDWR | O_APPEND, cloexec=True), reg(4, "/b", 7)]
    now = [reg(3, "/a", 2, O_RDWR)]
    reset, reopen = (s.as_dict() for s in plan_fds(then, now))
    assert reset == {
        "op": "reset-fd", "fd": 3, "kind": "REG", "path": "/a",
        "pos": {"old": 2, "new": 10}, "flags": {"old": "0", "new": "O_APPEND"},
        "cloexec": {"old": False, "new": True},
    }  # fmt: skip
    assert reopen == {
        "op": "reopen-fd", "fd": 4, "path": "/b", "flags": "O_RDWR", "pos": 7,
        "cloexec": False, "replaces": None,
    }  # fmt: skip


def test_show_lists_the_descriptor_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``applier show`` prints each descriptor of an image that has them (text and JSON)."""
    from applier.cli import main  # noqa: PLC0415

    assert main(["show", str(DATA / "state-criu-4.2")]) == 0
    out = capsys.readouterr().out
    assert "  15 descriptors" in out
    assert "  fd 3    REG       O_RDWR pos 1234 /tmp/golden-state/work/data.txt" in out
    assert "  fd 5    REG       O_RDONLY cloexec pos 3 /etc/hostname" in out
    assert "  fd 8    PIPE      O_WRONLY|O_NONBLOCK pipe 110413" in out
    assert "  fd 13   EVENTPOLL O_RDWR eventpoll" in out.splitlines()
    assert main(["show", "--json", str(DATA / "state-criu-4.2")]) == 0
    doc = json.loads(capsys.readouterr().out)
    fds = doc["processes"][0]["fds"]
    assert [d["fd"] for d in fds] == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert fds[3] == {
        "fd": 3, "type": "REG", "cloexec": False, "flags": "O_RDWR", "pos": 1234,
        "path": "/tmp/golden-state/work/data.txt", "ident": None,
    }  # fmt: skip


def test_a_pipe_or_socket_moved_to_another_number_is_duplicated_back() -> None:
    moved = pipe(9, 300)
    steps = plan_fds([*STDIO, pipe(7, 300)], [*STDIO, moved])
    assert steps == [DupFd(7, moved, False, 10), CloseFd(moved, 10)]
    assert steps[0].describe() == "dup     fd 9 (pipe:[300]) -> fd 7: closed since the checkpoint"
    # the other end of that pipe is not it
    with pytest.raises(MismatchError, match="fd 7: the pipe 300"):
        plan_fds([pipe(7, 300)], [pipe(9, 300, O_WRONLY)])
    # two sockets that swapped numbers: each source is the other's target
    with pytest.raises(MismatchError, match="replaced since"):
        plan_fds([sock(5, 1), sock(6, 2)], [sock(5, 2), sock(6, 1)])
