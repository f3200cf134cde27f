"""The package's shape: a module imports only modules below it, so `../shared/tools/import_cycles.py` (every
import counted, function-local and TYPE_CHECKING ones included) finds no cycle."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT.parent / "shared" / "tools" / "import_cycles.py"


def test_no_module_imports_one_that_imports_it_back():
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: the shared tools sit beside the checkout (../shared)")
    proc = subprocess.run([sys.executable, str(SCRIPT), "mathagent"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "no import cycles"
