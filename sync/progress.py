"""How long work reports progress below the CLI: a plain callable, so the CLI can draw a rich bar,
a web UI can stream it, and a script can ignore it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int | None, message: str) -> None:
        """``done`` of ``total`` units (None: not known yet); ``message`` says what is going on."""
