"""The paper's networks: ResNet-19/25/34, Highway-19, ResFuse-19/25."""

from .configs import CONFIGS, PAPER_PARAMETERS, NetConfig
from .nets import Net, build, highway19, resfuse19, resfuse25, resnet19, resnet25, resnet34

__all__ = ["CONFIGS", "PAPER_PARAMETERS", "Net", "NetConfig", "build", "highway19",
           "resfuse19", "resfuse25", "resnet19", "resnet25", "resnet34"]
