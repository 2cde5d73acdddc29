"""The planner: image side + live side of one task -> the steps that make the live task equal
to the checkpoint. Pure: no I/O, no ptrace; ``applier diff`` prints its result.

``steps`` is the vocabulary (and the ``Plan``), ``layout`` and ``memory`` plan one concern
each, ``make`` puts a whole plan together in execution order.
"""

from applier.plan.make import make_plan
from applier.plan.memory import restrict_to_pages
from applier.plan.steps import (
    CloseFd,
    CodeWrite,
    Discard,
    DupFd,
    EndThread,
    MapAnon,
    MapFile,
    NewThread,
    Plan,
    Protect,
    ReopenFd,
    ResetFd,
    SavedRuns,
    SetBrk,
    SetMm,
    SetRegs,
    SetSigactions,
    SetSigmask,
    Step,
    ThreadCall,
    Unmap,
    WritePages,
    WriteShared,
)

__all__ = [
    "CloseFd",
    "CodeWrite",
    "Discard",
    "DupFd",
    "EndThread",
    "MapAnon",
    "MapFile",
    "NewThread",
    "Plan",
    "Protect",
    "ReopenFd",
    "ResetFd",
    "SavedRuns",
    "SetBrk",
    "SetMm",
    "SetRegs",
    "SetSigactions",
    "SetSigmask",
    "Step",
    "ThreadCall",
    "Unmap",
    "WritePages",
    "WriteShared",
    "make_plan",
    "restrict_to_pages",
]
