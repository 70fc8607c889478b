"""RefiNet's networks (section 5.1, Figures 5-7; section 6.2's soft variant).

* **Level 1**: a classifier of this package (``small``, a three-stage
  ResNet of one basic block per stage and widths 16/32/64 for the synthetic
  data; ``resnet19``, ``resfuse19``, ... for 64x64 Tiny-ImageNet) or VGG-16 /
  VGG-16-BN (:mod:`.vgg`). :class:`Level1Spec` declares where it splits: the
  **trunk** (stem and the first ``split`` stages of a package net; VGG's
  ``features[:23]``, conv1_1 .. conv4_3, the paper's "first 10 layers") is
  shared and frozen; the **top** is the rest, ending in the linear
  classifier.
* **Level-2 heads**: one per cluster, a fresh copy of the top with as many
  outputs as the cluster has classes, trained from scratch on the trunk's
  features of that cluster's images.
* :class:`RefiNet`: one module, ``forward(x)`` -> class probabilities (N, C).
  The trunk runs once per batch; level 1's top gives the class
  probabilities that choose each image's cluster(s); each head runs on the
  images routed to it, gathered with ``index_select``, and its softmax is
  written into that cluster's columns:

      p(c | x) = sum_k w_k(x) p_k(c | x)       (p_k = 0 outside cluster k)

  Hard (RefiNet-L2/L3): ``w`` is one-hot on the voted leaf
  (:func:`~.vote.route`), or on the argmax of a cluster classifier (level 1
  "retrained to output cluster labels directly"). Soft (section 6.2):
  ``w`` is level 1's cluster probability (:func:`~.vote.cluster_mass`, or
  the cluster classifier's softmax) kept for the ``soft_top`` most probable
  clusters at or above ``soft_threshold`` (the most probable always) and
  renormalised to sum to 1; only those heads run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..models import Net, NetConfig, build
from ..models.configs import CONFIGS
from . import vgg
from .hierarchy import Hierarchy
from .vote import TOP, cluster_mass, route

# A small configuration of the package's blocks for the synthetic 32x32 data.
SMALL = NetConfig((("basic",), ("basic",), ("basic",)), widths=(16, 32, 64))
VGGS = {"vgg16": False, "vgg16_bn": True}
ARCHS = ("small", *CONFIGS, *VGGS)


@dataclass(frozen=True)
class Level1Spec:
    """A level-1 classifier and its split point.

    ``split``: for a package net, the number of stages in the trunk (default
    1; 0 is the stem alone); for VGG, the index in ``features`` where the
    trunk ends (default :func:`~.vgg.shared_end`, conv4_3). ``caffe``
    (VGG): the input goes to Caffe's BGR 0..255 less the means; ``resize``
    (VGG): the paper's resize to 256 and centre crop 224.
    """

    arch: str = "small"
    num_classes: int = 20
    split: Optional[int] = None
    caffe: bool = False
    resize: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown level-1 architecture {self.arch!r}; "
                             f"choose one of {', '.join(ARCHS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if (self.caffe or self.resize) and self.arch not in VGGS:
            raise ValueError("caffe and resize apply to the VGG level 1 only")
        limit = (vgg.features_length(VGGS[self.arch]) if self.arch in VGGS
                 else len(self._config().stages))
        if not 0 <= self.split_point <= limit:
            raise ValueError(f"split {self.split_point} out of range for {self.arch}")

    def _config(self) -> NetConfig:
        return SMALL if self.arch == "small" else CONFIGS[self.arch]

    @property
    def split_point(self) -> int:
        if self.split is not None:
            return self.split
        return vgg.shared_end(VGGS[self.arch]) if self.arch in VGGS else 1

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self, num_classes: Optional[int] = None,
              weights: Optional[str] = None) -> nn.Module:
        """A fresh level-1 classifier (``num_classes`` outputs, default the
        spec's), loaded from the user's ``weights`` file if given."""
        n = self.num_classes if num_classes is None else num_classes
        if self.arch in VGGS:
            return vgg.vgg16(n, batch_norm=VGGS[self.arch], weights=weights)
        net = Net(SMALL, n) if self.arch == "small" else build(self.arch, n)
        if weights is not None:
            vgg.load_weights(net, weights, reinit=("fc",))
        return net

    def retrained(self) -> Optional[tuple[str, ...]]:
        """The modules retrained on level 1 when it starts from the user's
        weights (VGG: the last two layers, as the paper); None: all."""
        return vgg.RETRAINED if self.arch in VGGS else None

    def parts(self, net: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
        """``(trunk, top)`` of ``net``: Sequentials of ``net``'s own modules
        (no copies) with ``top(trunk(x)) == net(x)``; ``top[-1]`` is the
        linear classifier."""
        s = self.split_point
        if self.arch in VGGS:
            pre = [vgg.CaffeInput()] if self.caffe else []
            pre += [vgg.Resize()] if self.resize else []
            trunk = nn.Sequential(*pre, *net.features[:s])
            top = nn.Sequential(*net.features[s:], net.avgpool, nn.Flatten(), *net.classifier)
            return trunk, top
        stages = [getattr(net, f"layer{i + 1}") for i in range(net.num_stages)]
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages[:s])
        top = nn.Sequential(*stages[s:], net.avgpool, nn.Flatten(), net.fc)
        return trunk, top

    def new_head(self, num_classes: int) -> nn.Sequential:
        """A level-2 head: a freshly initialised top with ``num_classes`` outputs."""
        return self.parts(self.build(num_classes))[1]


def soft_weights(mass: Tensor, top: int = 2, threshold: float = 0.05) -> Tensor:
    """(N, K) mixing weights from cluster probabilities ``mass`` (N, K): the
    ``top`` largest that are at least ``threshold`` (the largest always),
    renormalised to sum to 1 per row; zero elsewhere."""
    if top < 1:
        raise ValueError(f"soft_top must be at least 1, got {top}")
    values, index = mass.topk(min(top, mass.shape[1]), dim=1)
    keep = values >= threshold
    keep[:, 0] = True
    w = torch.zeros_like(mass).scatter_(1, index, values * keep)
    return w / w.sum(1, keepdim=True)


class RefiNet(nn.Module):
    """Level 1, a hierarchy and one head per leaf; ``forward`` gives (N, C)
    class probabilities (see the module's docstring for the mixing rule).

    ``cluster_head``: a linear layer on level 1's penultimate features with
    one output per leaf (flat hierarchies only): "RefiNet-L2 with level-1
    retrained to output cluster labels directly". ``soft``: section 6.2's
    mixing instead of one hard choice.
    """

    def __init__(self, spec: Level1Spec, level1: nn.Module, hierarchy: Hierarchy,
                 heads: Sequence[nn.Module], cluster_head: Optional[nn.Module] = None,
                 soft: bool = False, soft_top: int = 2, soft_threshold: float = 0.05,
                 top: int = TOP) -> None:
        super().__init__()
        if hierarchy.num_classes != spec.num_classes:
            raise ValueError(f"the hierarchy covers {hierarchy.num_classes} classes, level 1 "
                             f"{spec.num_classes}")
        if len(heads) != len(hierarchy.leaves):
            raise ValueError(f"{len(heads)} heads for {len(hierarchy.leaves)} clusters")
        if cluster_head is not None and hierarchy.depth != 1:
            raise ValueError("a cluster classifier routes a flat hierarchy only")
        self.spec, self.hierarchy = spec, hierarchy
        self.level1 = level1
        self.heads = nn.ModuleList(heads)
        self.cluster_head = cluster_head
        self.soft, self.soft_top, self.soft_threshold = soft, soft_top, soft_threshold
        self.top = top
        # Views of level1's modules, kept out of the registry (no duplicate state_dict keys).
        self._parts = spec.parts(level1)
        for p in level1.parameters():
            p.requires_grad_(False)

    @property
    def trunk(self) -> nn.Sequential:
        return self._parts[0]

    def level1_probs(self, h: Tensor) -> Tensor:
        """Level 1's class probabilities from the trunk's output ``h``."""
        return self._parts[1](h).softmax(1)

    def features(self, h: Tensor) -> Tensor:
        """Level 1's penultimate features (the input of its classifier)."""
        return self._parts[1][:-1](h)

    def weights(self, h: Tensor) -> Tensor:
        """(N, K) each image's weight on each cluster's head."""
        k = len(self.hierarchy.leaves)
        if self.cluster_head is not None:
            mass = self.cluster_head(self.features(h)).softmax(1)
            leaf = mass.argmax(1)
        else:
            probs = self.level1_probs(h)
            mass = cluster_mass(probs, self.hierarchy.leaves)
            leaf = None if self.soft else route(probs, self.hierarchy, self.top)
        if self.soft:
            return soft_weights(mass, self.soft_top, self.soft_threshold)
        return nn.functional.one_hot(leaf, k).to(h.dtype)

    def mix(self, h: Tensor, weights: Tensor) -> Tensor:
        """``sum_k weights[:, k] * head_k(h)`` in the full class space; head k
        runs only on the rows with a nonzero weight on it."""
        out = h.new_zeros(h.shape[0], self.spec.num_classes)
        for k, (head, leaf) in enumerate(zip(self.heads, self.hierarchy.leaves)):
            rows = weights[:, k].nonzero().squeeze(1)
            if not rows.numel():
                continue
            p = head(h.index_select(0, rows)).softmax(1)
            if p.shape[1] != len(leaf):
                raise ValueError(f"head {k} gives {p.shape[1]} outputs for {len(leaf)} classes")
            cols = torch.tensor(leaf, device=h.device)
            out[rows.unsqueeze(1), cols.unsqueeze(0)] += weights[rows, k].unsqueeze(1) * p
        return out

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return self.mix(h, self.weights(h))
