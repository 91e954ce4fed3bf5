"""The ``fact`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fact", description="FaCT: faithful concept traces.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo",
        help="train a tiny FaCT model on the embedded synthetic dataset and write explanations",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(
            "fact demo: not implemented yet. It will train a small B-cos network on the embedded\n"
            "synthetic dataset, insert a bias-free TopK SAE, and write exact concept\n"
            "contributions, pixel attributions and their completeness errors as PNGs."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
