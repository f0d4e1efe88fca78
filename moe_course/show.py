"""Show the package's own code inside a lesson, instead of pasting it."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["show_source"]


def show_source(obj: Any, *, lines: tuple[int, int] | None = None) -> None:
    """Display the source of a package function or class, highlighted when possible.

    lines: optional (first, last) 1-based line range within the object's source.
    """
    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise ValueError(f"cannot show the source of {obj!r}: {err}") from None
    if lines is not None:
        first, last = lines
        source = "\n".join(source.splitlines()[first - 1 : last])
    module = getattr(inspect.getmodule(obj), "__name__", "?")
    header = f"# {module}.{getattr(obj, '__qualname__', '')}\n"
    try:
        from IPython.display import Markdown, display

        display(Markdown(f"```python\n{header}{source}\n```"))
    except ImportError:  # outside Jupyter: plain text
        print(header + source)
