"""The ``c2score`` command line (filled by the c2score issue)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="c2score", description="C2 concept-consistency score.")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
