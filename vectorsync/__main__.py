"""``python -m vectorsync``: the command-line interface."""

from vectorsync.sync.cli import run

run()
