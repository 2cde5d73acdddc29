"""applier: apply CRIU checkpoint images into an already running process."""

__version__ = "0.2.0"  # the one source: pyproject.toml reads it (tool.setuptools.dynamic)

TYPE_CHECKING = False  # not typing's: importing typing costs the command line 9 ms
if TYPE_CHECKING:
    from typing import Any

    from applier.invoke import call, rollback

__all__ = ["__version__", "call", "rollback"]

# Imported on first use, so that ``import applier`` (and ``applier --version``) stay cheap.
_LAZY = {"call": "applier.invoke", "rollback": "applier.invoke"}


def __getattr__(name: str) -> "Any":
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'applier' has no attribute {name!r}")
