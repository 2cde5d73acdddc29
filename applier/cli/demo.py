"""``applier demo``: the built-in demo (``applier/demo``)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from applier import demo  # noqa: PLC0415 - the CLI imports per command

    return demo.run(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="revert a built-in demo process to a checkpoint",
        description="Start a demo server, checkpoint it, let it change for a while, apply the "
        "checkpoint into it and show that it is back, with the same pid, still running.",
    )
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before the checkpoint")
    p.add_argument("--run", type=float, default=1.5, help="seconds of change after it")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    p.set_defaults(func=run)
