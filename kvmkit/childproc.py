"""What every child process kvmkit starts gets: default signal handling."""

from __future__ import annotations

import signal


def default_signal_dispositions() -> None:
    """Run in the child between fork and exec: SIGINT/SIGTERM/SIGHUP/SIGQUIT back to their
    defaults and nothing blocked, since an ignored signal survives exec (a kvmkit started
    from a background job has SIGINT ignored, and its children would inherit that)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
