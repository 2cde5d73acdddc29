"""applier: apply CRIU checkpoint images into an already running process."""
