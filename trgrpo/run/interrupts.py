"""Ctrl-C during training: held while a step is being applied, so what an interrupted run checkpoints is
always the state after a whole step (the loop decides what to save)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("trgrpo")


class InterruptGuard:
    """Ctrl-C (SIGINT) outside `hold()` raises KeyboardInterrupt at once; inside, it is held until the
    block ends, so an optimizer step is never left half applied. A second Ctrl-C inside raises at once
    and sets `torn` (the state is then mid-update and must not be saved). Installed only in the main
    thread and only over Python's default handler (an ignored SIGINT stays ignored)."""

    def __init__(self) -> None:
        self.holding = self.pending = self.torn = False
        self.previous: Any = None

    def __enter__(self) -> InterruptGuard:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.holding and not self.pending:
            self.pending = True
            log.warning(
                "Ctrl-C: stopping after this step (press again to stop at once, without a checkpoint)"
            )
            return
        self.torn = self.holding
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise KeyboardInterrupt
