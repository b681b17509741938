"""``python -m devtools``: build helm and promcheck when they are not cached yet."""

from __future__ import annotations

import sys

from devtools import ToolUnavailable, build_all


def main() -> int:
    try:
        tools = build_all()
    except ToolUnavailable as exc:
        print(f"devtools: {exc}", file=sys.stderr)
        return 2
    for name, path in tools.items():
        print(f"devtools: {name} ready at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
