"""applier: apply CRIU checkpoint images into an already running process."""

__version__ = "0.2.0"  # the one source: pyproject.toml reads it (tool.setuptools.dynamic)
