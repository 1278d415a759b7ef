"""The Jinja2 environment shared by the UI's pages and ``vectorsync report``'s HTML."""

from __future__ import annotations

from functools import cache

from jinja2 import Environment, PackageLoader, select_autoescape


@cache
def environment() -> Environment:
    # autoescape: every value from the database is text to the browser, never markup
    env = Environment(loader=PackageLoader("vectorsync.sync.ui", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["number"] = _number
    return env


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
