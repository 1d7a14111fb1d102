"""The one way this project changes someone else's code: a name swapped for the duration of a scope.

Every patch of LitGPT, PyTorch or DeepSpeed goes through `swapped`, so that it is undone on exit (also on an
error) and fails loudly, at once, when an upgrade has moved the name it replaces.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def swapped(owner: object, name: str, replacement: Any) -> Iterator[None]:
    """Replace `owner.name` for the duration of the context; fail loudly if it does not exist."""
    if not hasattr(owner, name):
        raise AttributeError(f"{getattr(owner, '__name__', owner)} has no attribute {name!r}: LitGPT changed")
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)
