"""Functions run in child processes by the multiprocessing tests (importable, for spawn and forkserver)."""

from __future__ import annotations

from typing import Optional

from api_jongler import APIJongler

GEMINI = "generativelanguage.googleapis.com"
ENDPOINT = "/v1beta/models/gemini-1.5-flash:generateContent"

# Set by the parent before it forks: an instance the child inherits.
INHERITED: Optional[APIJongler] = None


def request_in_child(_: int) -> int:
    """A child builds its own instance and sends one request; its status."""
    return APIJongler(GEMINI).request("POST", ENDPOINT, "{}")[1]


def use_inherited(_: int) -> str:
    """A child uses the parent's instance; what it raised."""
    assert INHERITED is not None
    try:
        INHERITED.request("POST", ENDPOINT, "{}")
    except RuntimeError as error:
        return f"RuntimeError: {error}"
    return "no error"
