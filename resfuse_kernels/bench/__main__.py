"""``python -m resfuse_kernels.bench {table3,ops} [options]`` (also ``resfuse-bench``).

* ``table3``: the paper's Table 3, parameters and training time per epoch
  per network, provider (reference/fused, eager/torch.compile) and precision;
  ``--params-only`` prints just the parameter counts.
* ``ops``: the fused ops against eager PyTorch and torch.compile: time,
  achieved GB/s from the minimum bytes, fraction of a copy's bandwidth.
* ``convert``: torchvision-style (and, where installed, torchvision's and
  timm's) ResNet-18/50, a training step original vs ``rk.convert``-ed.

Results go to bench/results/ (JSON, Markdown, and a PNG for table3).
``--help`` on each lists the options.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import convert, ops, table3

    parser = argparse.ArgumentParser(prog="resfuse-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t3 = sub.add_parser("table3", help="the paper's Table 3: parameters and time per epoch",
                        description=table3.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    table3.add_arguments(t3)
    op = sub.add_parser("ops", help="op benchmarks: time, GB/s, fraction of copy bandwidth",
                        description=ops.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ops.add_arguments(op)
    cv = sub.add_parser("convert", help="rk.convert on ResNet-18/50: original vs converted",
                        description=convert.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_arguments(cv)
    args = parser.parse_args(argv)
    if args.command == "convert":
        return convert.main(args)
    if args.command == "table3":
        return table3.main(args)
    return ops.main(args)


if __name__ == "__main__":
    sys.exit(main())
