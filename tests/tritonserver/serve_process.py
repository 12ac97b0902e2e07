"""`caphuman serve` as a child process, for the tests that start it: the command and a bounded line reader."""
from __future__ import annotations

import queue
import sys
import threading
import time

CAPHUMAN = [sys.executable, "-c", "import sys; from caphuman.runtime.cli import main; sys.exit(main())"]  # `caphuman`


def read_until(proc, prefix: str, lines: list[str], timeout: float) -> str:
    """The first line of serve's output starting with `prefix`, within `timeout` seconds (a reader thread,
    so a serve that prints nothing fails the test instead of blocking it); every line read goes to `lines`."""
    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        proc.reader = threading.Thread(target=lambda: [proc.lines.put(line) for line in proc.stdout], daemon=True)
        proc.reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = proc.lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        lines.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} in {timeout:.0f} s:\n{''.join(lines)}")


def read_rest(proc, lines: list[str], timeout: float) -> str:
    """Everything serve prints until it exits (within `timeout` seconds), after a `read_until`."""
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=10)  # it ends at the end of serve's output
    rest = []
    while not proc.lines.empty():
        rest.append(proc.lines.get_nowait())
    lines.extend(rest)
    return "".join(rest)
