"""``python -m resfuse_kernels.train``: see :mod:`resfuse_kernels.train.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
