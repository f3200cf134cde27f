"""The zygote's program: `client.Sandbox` runs `python -I -B <this file> CONFIG` with an empty environment, and
`zygote.zygote_main` takes it from there.

`python -I` puts neither this file's directory nor PYTHONPATH on sys.path, and the mathagent installed there
may be another copy than the caller's (an editable install of another checkout). So the package is imported
from the directory that holds this one, which then leaves sys.path again: what a cell may import, and what a
session's mount namespace exposes of the Python installation, stay as they were.
"""

import json
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    from mathagent.sandbox.zygote import zygote_main

    sys.path.remove(root)
    zygote_main(json.loads(sys.argv[1]))
