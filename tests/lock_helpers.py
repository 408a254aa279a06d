"""Another process that holds a run folder's lock (lm_opt.run_lock), as another `fit` or sweep would,
for as long as a test leaves its stdin open."""

import subprocess
import sys
from pathlib import Path

HOLD = """
import sys
from pathlib import Path
from lm_opt.run_lock import try_lock

folder, role, summary = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = try_lock(folder, role)
print("held" if lock else "busy", flush=True)
sys.stdin.read()
if summary:
    (folder / "summary.json").write_text(summary)
lock.release()
"""


def hold(folder: Path, role: str = "fit", summary: str = "") -> subprocess.Popen:
    """A process holding `folder`'s lock until its stdin is closed (`let_go`), then writing `summary`
    (if any) into the folder before it releases the lock, as a run that ends does; or until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), role, summary], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def let_go(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
