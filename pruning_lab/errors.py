"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint), and the check most
of them share: a value given twice."""
from typing import Any, Callable, Iterable, Optional


class UserError(Exception):
    """A problem in the user's input: the CLI prints its message on one line and exits with status 2."""


def given_twice(items: Iterable, key: Optional[Callable[[Any], Any]] = None) -> Any:
    """The first item whose `key` (default: itself) an earlier item has, or None: what an error names."""
    seen = []
    for item in items:
        k = item if key is None else key(item)
        if k in seen:
            return item
        seen.append(k)
    return None
