"""What the sandbox's processes say to each other, in one place that the caller (`client`), the supervisor S
and the holder (`cell`) all read: the statuses of a cell, the framing of S's replies, the size of a cell,
and the time a cell gets to unwind.

    caller --[FRAME + JSON request: reset, cells]--> S --[SEQPACKET JSON "run"]--> holder
    caller <--[FRAME + JSON reply per cell]-------- S <--[SEQPACKET JSON "result"]-- holder

Every message from the holder's side is hostile until it parses: a cell runs in the holder's process and can
write on its sockets (`supervisor`).
"""

import math
import struct

STATUSES = ("ok", "error", "memory", "timeout", "killed")
KEPT_STATUSES = ("ok", "error", "memory")  # the cell ran to its end in the holder, which keeps its state
MAX_CODE_BYTES = 4 << 20  # the largest cell S hands to a holder (one SEQPACKET message)
FRAME = struct.Struct(">I")  # the length of each JSON message between the caller and S
GRACE_SECONDS = 1.0  # after `timeout`, how long a cell may take to unwind before S ends it


def cpu_limit(timeout: float) -> int:
    """The seconds of CPU time a cell's processes may use together, for a wall `timeout`."""
    return math.ceil(timeout) + 1
