"""resfuse-kernels: fused GPU kernels for the ResFuse and Highway networks.

    import resfuse_kernels as rk
    model = rk.models.resfuse19(num_classes=100, fused=True)
    rk.convert(model, fused=False)          # back to the reference blocks

``rk.ops`` holds the fused ops (``torch.ops.resfuse.*``), ``rk.nn`` the
blocks, ``rk.models`` the networks, ``rk.backends`` the choice of kernels.
``python -m resfuse_kernels.info`` says which backends can run here.
"""

from . import backends, models, nn, ops, reference
from .nn import convert

__version__ = "0.1.0"

__all__ = ["backends", "convert", "models", "nn", "ops", "reference", "__version__"]
