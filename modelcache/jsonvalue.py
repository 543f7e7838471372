"""JSON from outside, within bounds: one rule for request bodies, sidecars, manifests and headers.

Python's ``json`` parses nesting up to the interpreter's recursion limit (a
``RecursionError``, not a ``ValueError``, past about 1,000 levels) and
pydantic refuses to serialise past a few hundred, so a value nested 300 deep
could be stored and then break every read that returned it. Every JSON value
that comes from outside is parsed by :func:`loads`, which refuses what is
deeper than :data:`MAX_DEPTH`, longer or wider than the bounds, or not a
finite number PostgreSQL and other clients can hold; nothing deeper is ever
stored.

Reads from the registry go through :func:`loads_stored`, which never fails
on depth: a row stored before these bounds existed is shown with the too-deep
part replaced by a note, rather than breaking the page that holds it.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # objects and arrays inside each other, the outermost counting as 1
MAX_MEMBERS = 10_000  # members of one object or items of one array
MAX_STRING = 65_536  # characters in one string or key
MAX_INT = 2**63 - 1  # integers fit a signed 64-bit number, as most clients read them

TOO_DEEP = f"(nested deeper than {MAX_DEPTH} levels: not shown)"


def loads(raw: bytes | str, *, max_bytes: int, max_members: int = MAX_MEMBERS, max_string: int = MAX_STRING,
          max_int: int | None = MAX_INT) -> Any:
    """A JSON value within the bounds; ValueError saying which bound (or the syntax) it breaks.

    ``max_int=None`` lets integers be as large as the parser reads (4,300 digits): files made by
    others hold such values (Hugging Face tokenizer configs say ``model_max_length`` is ``int(1e30)``).
    """
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    check(value, max_members=max_members, max_string=max_string, max_int=max_int)
    return value


def check(value: Any, *, max_members: int = MAX_MEMBERS, max_string: int = MAX_STRING,
          max_int: int | None = MAX_INT) -> None:
    """Raise ValueError unless ``value`` (as parsed from JSON) keeps within the bounds.

    The message fits after "the body is" and names where the value at fault is (``capabilities.a[3]``).
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            if len(item) > max_members:
                kind = "an object" if isinstance(item, dict) else "an array"
                raise _out_of_bounds(where, f"{kind} of {len(item)} members, more than {max_members}")
            if isinstance(item, dict):
                for key, member in item.items():
                    if len(key) > max_string:
                        raise _out_of_bounds(where, f"a key of {len(key)} characters, longer than {max_string}")
                    stack.append((member, depth + 1, f"{where}.{key}" if where else key))
            else:
                stack.extend((member, depth + 1, f"{where}[{i}]") for i, member in enumerate(item))
        elif isinstance(item, str):
            if len(item) > max_string:
                raise _out_of_bounds(where, f"a string of {len(item)} characters, longer than {max_string}")
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, int):
            if max_int is not None and not -max_int - 1 <= item <= max_int:
                raise _out_of_bounds(where, f"the integer {_shown(str(item))}, outside {-max_int - 1}..{max_int}")
        elif isinstance(item, float) and not math.isfinite(item):
            raise _out_of_bounds(where, "a number beyond the range of a double")


def loads_stored(raw: bytes | str) -> Any:
    """A JSON value read back from the registry, never failing on depth.

    What is nested deeper than :data:`MAX_DEPTH` (only rows stored before the
    bound can be) is replaced by the string :data:`TOO_DEEP`.
    """
    try:
        value = json.loads(raw)
    except RecursionError:  # deeper than the parser itself goes: nothing of it can be shown
        return {"unreadable": TOO_DEEP}
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        members = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, member in members:
            if isinstance(member, dict | list):
                if depth + 1 > MAX_DEPTH:
                    item[key] = TOO_DEEP
                else:
                    stack.append((member, depth + 1))
    return value


def _out_of_bounds(where: str, what: str) -> ValueError:
    return ValueError(f"out of bounds at {_shown(where) if where else 'the top'}: {what}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
