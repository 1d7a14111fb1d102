"""The one way this project changes someone else's code: a name swapped for the duration of a scope.

Every patch of LitGPT, PyTorch or DeepSpeed goes through `swapped`, so that it is undone on exit (also on an
error) and fails loudly, at once, when an upgrade has moved the name it replaces.
"""

from collections.abc import Callable, Iterator
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


def user_optimizer(stock: Callable, optimizer: str | dict, parameters: Any, **defaults: Any) -> Any:
    """LitGPT's optimizer factory (`instantiate_torch_optimizer`), with the user's own init_args kept over the
    defaults its callers pass (LitGPT forces fused=True on CUDA, whatever the config says)."""
    if isinstance(optimizer, dict):
        defaults = {key: value for key, value in defaults.items() if key not in (optimizer.get("init_args") or {})}
    return stock(optimizer, parameters, **defaults)
