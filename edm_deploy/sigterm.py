"""SIGTERM for the command line: unwind like Ctrl-C, and stop within a grace even inside a long call.

Kept apart from `edm_deploy.cli` so that a command can lengthen the grace (`serve` drains first)
when the CLI runs as ``python -m edm_deploy.cli`` (then `cli` is ``__main__``, a second module).
"""

from __future__ import annotations

import sys
from typing import Any

# How long a SIGTERM may wait for the run to unwind before the process stops without it.
# Schedulers send SIGKILL after a grace of their own (docker 10 s, Slurm 30 s); this is below both.
SIGTERM_GRACE_S = 5.0
_watchdog_started = False


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping a job) unwinds like Ctrl-C, so temporary files are removed.

    Python runs a signal handler only between bytecodes of the main thread, so a SIGTERM that
    arrives during one long call (a network evaluation, a BLAS product, a zlib stream) would
    wait for it to return. A watchdog thread woken by the signal itself (`signal.set_wakeup_fd`:
    the interpreter's C-level handler writes the signal number to a pipe) gives the unwinding
    `SIGTERM_GRACE_S` seconds and then ends the process. That is safe because every output is
    written atomically: what a stop leaves is whole files and temporary ones the next run
    removes. (A call that holds the GIL throughout delays the watchdog too; the inputs that
    made such calls long are bounded before anything is allocated.)
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        _start_sigterm_watchdog()


def extend_sigterm_grace(seconds: float) -> None:
    """A command that drains on SIGTERM itself (`serve`) gives the watchdog a grace past its own drain."""
    global SIGTERM_GRACE_S
    SIGTERM_GRACE_S = max(SIGTERM_GRACE_S, float(seconds))


def _on_sigterm(signum: int, frame: Any) -> None:
    """Remove the temporaries of the writes in progress first (the unwinding may not finish), then unwind."""
    from edm_deploy.runtime.core.fileio import remove_live_temporaries

    remove_live_temporaries()
    sys.exit(143)


def _start_sigterm_watchdog() -> None:
    import os
    import signal
    import threading
    import time

    global _watchdog_started
    if _watchdog_started:
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
        os.close(read_end)
        os.close(write_end)
        return
    _watchdog_started = True

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_end, 64):
            pass
        time.sleep(SIGTERM_GRACE_S)
        from edm_deploy.runtime.core.fileio import remove_live_temporaries

        remove_live_temporaries()
        os.write(2, f"error: stopped {SIGTERM_GRACE_S:g} s after SIGTERM while a long call was running; outputs "
                    "are whole files or temporary ones the next run removes\n".encode())
        os._exit(143)

    threading.Thread(target=watch, name="sigterm-watchdog", daemon=True).start()
