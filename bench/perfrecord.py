"""`perf record` of a benchmarked process: where its CPU time goes by library and
symbol (OpenSSL, the interpreter, the kernel), read back with

    perf report -i FILE --sort dso,sym --stdio
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from common import stop_process


class PerfRecord:
    """`perf record` of one process until closed: CPU samples by library and symbol,
    from the kernel's clock, so unlike py-spy's wall-clock samples a thread that
    waits for a core on a busy machine adds nothing."""

    def __init__(self, pid: int, output: Path, calls: bool = False) -> None:
        exe = shutil.which("perf")
        if exe is None:
            raise RuntimeError("perf is not installed (apt-get install linux-perf)")
        self.proc = subprocess.Popen([exe, "record", "-q", "-F", "999", *(["-g"] if calls else []),
                                      "-p", str(pid), "-o", str(output)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        """SIGINT makes perf write its file and exit."""
        stop_process(self.proc, 30, signal.SIGINT)
