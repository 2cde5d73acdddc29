"""What an apply overwrites: the undo log (``log``: inverse records and a page spool, replayed
by ``applier.executor.rollback``) and its export as a CRIU image directory (``image``:
``apply --undo DIR``)."""
