"""Child-process helpers shared by the dev stack, the embedded services and the bench."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for children: own session, and SIGTERM when the parent dies.

    If ``ext-proc dev`` (or a test) is killed outright, its children must not outlive it
    holding ports; Linux delivers the signal for us (elsewhere this only sets the session).
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stop_process(process: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM a running child and reap it, SIGKILL if it is not gone within ``timeout``
    seconds; True when it had to be killed."""
    if process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False
