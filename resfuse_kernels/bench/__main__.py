"""``python -m resfuse_kernels.bench table3 [--classes N]``."""

from __future__ import annotations

import argparse
import sys

from . import table3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resfuse_kernels.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    t3 = sub.add_parser("table3", help="the paper's Table 3: parameters per network")
    t3.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    args = parser.parse_args(argv)
    if args.command == "table3":
        return table3.main(args.classes)
    return 2


if __name__ == "__main__":
    sys.exit(main())
