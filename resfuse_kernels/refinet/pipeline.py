"""The RefiNet pipeline in resumable steps (section 5.2.1's "training overview").

    level1    train level 1 (or load the user's weights, retraining the last layers)
    score     level 1's class probabilities and penultimate features on the
              validation and test images
    cluster   eqs. 6 and 7 on the validation scores; every clustering
              (Table 4), spectral against K (Figure 9a); the hierarchies:
              L2 (K clusters), L3 (the largest split again), and with
              ``max_size`` the size-threshold tree (section 6.2)
    level2    one head per cluster of every hierarchy, trained on the frozen
              trunk; the cluster classifier of "L2 + retrain"
    evaluate  top-1/top-5 of every model on validation and test (Tables 5/6),
              per-cluster accuracy (Table 7), the t-SNE (Figure 11); the reports

Each step writes its files into the run directory and a marker
``<step>.done.json`` holding a key (a hash of the settings the step reads
and of its inputs' markers) and the hashes of its outputs. A step whose
marker matches is skipped; one whose settings or inputs changed is redone,
and so is everything after it. Asking for a step runs the steps it needs
first. Each step seeds itself, so a resumed run computes what one
uninterrupted run computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import clustering, loop
from .affinity import AFFINITIES
from .data import Dataset, load_synthetic, load_tiny_imagenet
from .hierarchy import Hierarchy, split_largest, split_until
from .metrics import topk_accuracy
from .model import Level1Spec, RefiNet
from .vote import cluster_accuracy, route

STEPS = ("level1", "score", "cluster", "level2", "evaluate")
NEEDS = {"level1": (), "score": ("level1",), "cluster": ("score",),
         "level2": ("level1", "cluster"), "evaluate": ("level1", "score", "cluster", "level2")}

_DATA = ("data", "classes", "train_limit", "eval_limit", "per_class", "eval_per_class", "size")


@dataclass
class Config:
    """Every setting of a run (the command line's options)."""

    run: str = "runs/refinet-synthetic"
    data: Optional[str] = None            # a Tiny-ImageNet folder; None: synthetic
    classes: int = 100
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    per_class: int = 100                  # synthetic: training images per class
    eval_per_class: int = 25              # synthetic: validation and test images per class
    size: int = 32                        # synthetic image size
    arch: Optional[str] = None            # None: "small" (synthetic), "resfuse19" (Tiny-ImageNet)
    split: Optional[int] = None
    weights: Optional[str] = None
    caffe: bool = False
    resize: bool = False
    level1_epochs: int = 3
    level1_lr: float = 1e-3
    batch_size: int = 50
    k: int = 4
    method: str = "spectral"
    affinity: str = "eq6"
    assign_labels: str = "kmeans"
    ks: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    max_size: Optional[int] = None
    level2_epochs: int = 8
    level2_lr: float = 3e-3
    retrain_epochs: int = 2
    soft_top: int = 2
    soft_threshold: float = 0.05
    tsne_limit: int = 2000
    seed: int = 0

    # The settings each step reads (its upstream steps' markers cover the rest).
    READS: dict = field(default_factory=lambda: {
        "level1": _DATA + ("arch", "weights", "caffe", "resize", "level1_epochs", "level1_lr",
                           "batch_size", "seed"),
        "score": (),
        "cluster": ("k", "method", "affinity", "assign_labels", "ks", "max_size", "seed"),
        "level2": ("split", "level2_epochs", "level2_lr", "retrain_epochs", "batch_size", "seed"),
        "evaluate": ("soft_top", "soft_threshold", "tsne_limit", "seed"),
    }, repr=False, compare=False)

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "READS"}

    def spec(self, num_classes: int) -> Level1Spec:
        arch = self.arch or ("small" if self.data is None else "resfuse19")
        return Level1Spec(arch, num_classes, self.split, self.caffe, self.resize)

    def check(self) -> None:
        if self.method not in clustering.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(clustering.METHODS)}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"unknown affinity {self.affinity!r}; "
                             f"choose one of {', '.join(AFFINITIES)}")
        if self.k < 2 or any(k < 2 for k in self.ks):
            raise ValueError("K must be at least 2")
        if self.level1_epochs < 0 or self.level2_epochs < 1 or self.retrain_epochs < 1:
            raise ValueError("level-1 epochs must be >= 0 (0: use the weights as they are), "
                             "level-2 and retrain epochs >= 1")
        if self.level1_epochs == 0 and self.weights is None:
            raise ValueError("level1_epochs=0 needs weights to load")


def log(message: str) -> None:
    print(f"[refinet] {message}", file=sys.stderr, flush=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seed(config: Config, *names: Any) -> int:
    """A seed of its own for each piece of work, so steps do not depend on each other's RNG."""
    return (config.seed * 1_000_003 + zlib.crc32(repr(names).encode())) % 2 ** 31


class Run:
    """A run directory and the steps' work."""

    def __init__(self, config: Config) -> None:
        config.check()
        self.config = config
        self.dir = Path(config.run)
        self._data: Optional[Dataset] = None

    # -- bookkeeping ---------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.dir / name

    def data(self) -> Dataset:
        if self._data is None:
            c = self.config
            self._data = (load_synthetic(c.per_class, c.eval_per_class, c.size, c.seed)
                          if c.data is None else
                          load_tiny_imagenet(c.data, c.classes, c.train_limit, c.eval_limit))
        return self._data

    def key(self, step: str) -> str:
        settings = {name: self.config.settings()[name] for name in self.config.READS[step]}
        if step == "level1" and self.config.weights is not None:
            settings["weights_sha256"] = _sha(Path(self.config.weights))
        upstream = {}
        for need in NEEDS[step]:
            marker = self.marker(need)
            upstream[need] = marker["outputs"] if marker else None
        text = json.dumps({"step": step, "settings": settings, "upstream": upstream},
                          sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()

    def marker(self, step: str) -> Optional[dict]:
        path = self.path(f"{step}.done.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self, step: str) -> bool:
        marker = self.marker(step)
        if marker is None or marker["key"] != self.key(step):
            return False
        return all(self.path(f).is_file() and _sha(self.path(f)) == h
                   for f, h in marker["outputs"].items())

    def run(self, targets: tuple[str, ...] = STEPS, force: tuple[str, ...] = ()) -> dict[str, str]:
        """Run ``targets`` and the steps they need; ``force`` redoes those
        named even when done. Returns each step's fate ("ran"/"skipped")."""
        unknown = sorted((set(targets) | set(force)) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown steps {unknown}; the steps are {', '.join(STEPS)}")
        wanted: set[str] = set()

        def need(step: str) -> None:
            wanted.add(step)
            for s in NEEDS[step]:
                need(s)
        for t in targets:
            need(t)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path("config.json").write_text(json.dumps(self.config.settings(), indent=1,
                                                       default=list))
        fate = {}
        for step in (s for s in STEPS if s in wanted):
            if step not in force and self.done(step):
                log(f"{step}: done before, skipped")
                fate[step] = "skipped"
                continue
            self.path(f"{step}.done.json").unlink(missing_ok=True)
            start = time.perf_counter()
            log(f"{step}: running")
            outputs = getattr(self, f"step_{step}")()
            marker = {"key": self.key(step),
                      "outputs": {f: _sha(self.path(f)) for f in sorted(outputs)},
                      "seconds": round(time.perf_counter() - start, 2)}
            self.path(f"{step}.done.json").write_text(json.dumps(marker, indent=1))
            log(f"{step}: done in {marker['seconds']} s")
            fate[step] = "ran"
        return fate

    # -- loading what earlier steps wrote -------------------------------------

    def level1(self) -> tuple[Level1Spec, nn.Module]:
        saved = torch.load(self.path("level1.pt"), weights_only=True)
        spec = Level1Spec(**saved["spec"])
        net = spec.build()
        net.load_state_dict(saved["state_dict"])
        return spec, net.eval()

    def hierarchies(self) -> dict[str, Hierarchy]:
        saved = json.loads(self.path("clusters.json").read_text())
        return {name: Hierarchy(tree) for name, tree in saved["hierarchies"].items()}

    def heads(self, spec: Level1Spec, hierarchy: Hierarchy) -> list[nn.Module]:
        heads = []
        for leaf in hierarchy.leaves:
            head = spec.new_head(len(leaf))
            head.load_state_dict(torch.load(self.path(_head_file(leaf)), weights_only=True))
            heads.append(head.eval())
        return heads

    def cluster_head(self, spec: Level1Spec, net: nn.Module, k: int) -> nn.Linear:
        head = nn.Linear(spec.parts(net)[1][-1].in_features, k)
        head.load_state_dict(torch.load(self.path("level2/cluster_head.pt"), weights_only=True))
        return head.eval()

    # -- the steps ------------------------------------------------------------

    def step_level1(self) -> list[str]:
        c, data = self.config, self.data()
        spec = c.spec(data.num_classes)
        torch.manual_seed(_seed(c, "level1"))
        net = spec.build(weights=c.weights)
        retrained = spec.retrained() if c.weights is not None else None
        if retrained is None:
            params, modules = list(net.parameters()), [net]
        else:
            params = [p for name in retrained for p in net.get_submodule(name).parameters()]
            # Only the classifier (Linear, ReLU, Dropout) is in train mode: the
            # frozen BatchNorms of VGG-16-BN keep their statistics.
            modules = [net.classifier]
            net.eval()
        losses: list[float] = []
        if c.level1_epochs:
            log(f"level1: {spec.arch}, {len(data.train[1])} images, {c.level1_epochs} epochs"
                + (f", retraining {', '.join(retrained)}" if retrained else ""))
            losses = loop.fit(net, params, modules, *data.train, epochs=c.level1_epochs,
                              lr=c.level1_lr, batch_size=c.batch_size,
                              seed=_seed(c, "level1", "batches"), desc="level1")
        torch.save({"spec": spec.to_dict(), "state_dict": net.state_dict()}, self.path("level1.pt"))
        self.path("level1.json").write_text(json.dumps(
            {"spec": spec.to_dict(), "losses": losses, "weights": c.weights,
             "retrained": list(retrained) if retrained else "all",
             "train_images": len(data.train[1])}, indent=1))
        return ["level1.pt", "level1.json"]

    def step_score(self) -> list[str]:
        spec, net = self.level1()
        trunk, top = spec.parts(net)
        data = self.data()
        out = {}
        width = top[-1].in_features

        def features_and_logits(x: Tensor) -> Tensor:
            z = top[:-1](trunk(x))
            return torch.cat([z, top[-1](z)], 1)

        for name, (images, labels) in (("val", data.val), ("test", data.test)):
            both = loop.predict(features_and_logits, images, desc=f"score {name}")
            out[name] = {"features": both[:, :width].contiguous(),
                         "probs": both[:, width:].softmax(1), "labels": labels}
        torch.save(out, self.path("scores.pt"))
        return ["scores.pt"]

    def scores(self) -> dict[str, dict[str, Tensor]]:
        return torch.load(self.path("scores.pt"), weights_only=True)

    def step_cluster(self) -> list[str]:
        c, data = self.config, self.data()
        val = self.scores()["val"]
        probs, labels = val["probs"], val["labels"]
        truth = data.super_classes

        def measure(labels_k: np.ndarray) -> dict:
            h = Hierarchy.from_labels(labels_k)
            result = {"labels": labels_k.tolist(),
                      "cluster_accuracy": cluster_accuracy(route(probs, h), labels, h)}
            if truth is not None:
                from sklearn.metrics import adjusted_rand_score
                result["ari"] = float(adjusted_rand_score(truth, labels_k))
            return result

        affinities = {name: f(probs.numpy(), labels.numpy()) for name, f in AFFINITIES.items()}
        table4: dict[str, dict[str, Any]] = {}
        variants = [("spectral", {"assign_labels": a}) for a in clustering.ASSIGN_LABELS]
        variants += [(m, {}) for m in clustering.METHODS if m != "spectral"]
        for method, options in variants:
            row = method + (f" ({options['assign_labels']})" if options else "")
            table4[row] = {}
            for name, a in affinities.items():
                try:
                    labels_k = clustering.cluster(a, c.k, method, c.seed, **options)
                    table4[row][name] = measure(labels_k)
                except clustering.KNotReached as error:
                    table4[row][name] = {"error": str(error)}
        figure9a = {}
        for k in c.ks:
            if k <= data.num_classes:
                labels_k = clustering.cluster(affinities[c.affinity], k, c.method, c.seed,
                                              assign_labels=c.assign_labels)
                figure9a[k] = measure(labels_k)["cluster_accuracy"]
        options = {"seed": c.seed, "assign_labels": c.assign_labels}
        l2 = Hierarchy.from_labels(clustering.cluster(affinities[c.affinity], c.k, c.method,
                                                      **options))
        hierarchies = {"L2": l2,
                       "L3": split_largest(l2, affinities[c.affinity], c.method, **options)}
        if c.max_size is not None:
            hierarchies["threshold"] = split_until(l2, affinities[c.affinity], c.max_size,
                                                   c.method, **options)
        saved = {"class_names": data.class_names, "k": c.k, "method": c.method,
                 "affinity": c.affinity, "assign_labels": c.assign_labels,
                 "max_size": c.max_size,
                 "affinities": {n: a.tolist() for n, a in affinities.items()},
                 "table4": table4, "figure9a": figure9a,
                 "hierarchies": {n: json.loads(h.to_json()) for n, h in hierarchies.items()},
                 "cluster_accuracy": {n: cluster_accuracy(route(probs, h), labels, h)
                                      for n, h in hierarchies.items()}}
        if truth is not None:
            saved["true_super_classes"] = list(truth)
        self.path("clusters.json").write_text(json.dumps(saved, indent=1))
        return ["clusters.json"]

    def step_level2(self) -> list[str]:
        c, data = self.config, self.data()
        spec, net = self.level1()
        trunk, top = spec.parts(net)
        images, labels = data.train
        hierarchies = self.hierarchies()
        self.path("level2").mkdir(exist_ok=True)
        leaves = sorted({leaf for h in hierarchies.values() for leaf in h.leaves})
        losses = {}

        def frozen(part: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
            def run(x: Tensor) -> Tensor:
                with torch.no_grad():
                    return part(x)
            return run

        features = frozen(trunk)
        for i, leaf in enumerate(leaves):
            rows = torch.isin(labels, torch.tensor(leaf)).nonzero().squeeze(1)
            local = _local_labels(leaf, data.num_classes)
            torch.manual_seed(_seed(c, "head", leaf))
            head = spec.new_head(len(leaf))
            losses[",".join(map(str, leaf))] = loop.fit(
                lambda x, head=head: head(features(x)), head.parameters(), [head],
                images[rows], local[labels[rows]], epochs=c.level2_epochs, lr=c.level2_lr,
                batch_size=c.batch_size, seed=_seed(c, "head batches", leaf),
                desc=f"head {i + 1}/{len(leaves)} ({len(leaf)} classes)")
            torch.save(head.state_dict(), self.path(_head_file(leaf)))
        # "L2 + retrain": level 1's output layer retrained to give the L2 cluster directly.
        l2 = hierarchies["L2"]
        torch.manual_seed(_seed(c, "cluster head"))
        cluster_head = nn.Linear(top[-1].in_features, len(l2.leaves))
        penultimate = frozen(lambda x: top[:-1](trunk(x)))
        to_cluster = torch.as_tensor(l2.class_to_leaf())
        losses["cluster_head"] = loop.fit(
            lambda x: cluster_head(penultimate(x)), cluster_head.parameters(), [cluster_head],
            images, to_cluster[labels], epochs=c.retrain_epochs, lr=c.level2_lr,
            batch_size=c.batch_size, seed=_seed(c, "cluster head batches"), desc="cluster head")
        torch.save(cluster_head.state_dict(), self.path("level2/cluster_head.pt"))
        self.path("level2.json").write_text(json.dumps({"losses": losses}, indent=1))
        return ["level2.json", "level2/cluster_head.pt"] + [_head_file(leaf) for leaf in leaves]

    def models(self) -> dict[str, nn.Module]:
        """Every model of Tables 5/6, by name; each maps images to (N, C) probabilities."""
        c = self.config
        spec, net = self.level1()
        hierarchies = self.hierarchies()
        l2 = hierarchies["L2"]
        heads = self.heads(spec, l2)
        models: dict[str, nn.Module] = {"flat level 1": nn.Sequential(net, nn.Softmax(1))}
        models["RefiNet-L2"] = RefiNet(spec, net, l2, heads)
        models["RefiNet-L2 + retrain"] = RefiNet(spec, net, l2, heads,
                                                 self.cluster_head(spec, net, len(l2.leaves)))
        models["RefiNet-L3"] = RefiNet(spec, net, hierarchies["L3"],
                                       self.heads(spec, hierarchies["L3"]))
        models["RefiNet-L2 soft"] = RefiNet(spec, net, l2, heads, soft=True,
                                            soft_top=c.soft_top, soft_threshold=c.soft_threshold)
        if "threshold" in hierarchies:
            h = hierarchies["threshold"]
            models[f"RefiNet size <= {c.max_size}"] = RefiNet(spec, net, h, self.heads(spec, h))
        return {name: m.eval() for name, m in models.items()}

    def step_evaluate(self) -> list[str]:
        from . import report

        c, data = self.config, self.data()
        models = self.models()
        table5 = {}
        for name, model in models.items():
            row = {}
            for split, (images, labels) in (("val", data.val), ("test", data.test)):
                probs = loop.predict(model, images, desc=f"{name} {split}")
                row[f"{split} top-1"] = topk_accuracy(probs, labels, 1)
                row[f"{split} top-5"] = topk_accuracy(probs, labels, min(5, data.num_classes))
                if isinstance(model, RefiNet) and not model.soft:
                    chosen = loop.predict(lambda x: model.weights(model.trunk(x)).argmax(1),
                                          images)
                    row[f"{split} cluster accuracy"] = cluster_accuracy(chosen, labels,
                                                                        model.hierarchy)
            table5[name] = row
        table7 = self.per_cluster(models["RefiNet-L2"])
        tsne = self.tsne(models["RefiNet-L2"].hierarchy)
        torch.save(tsne, self.path("tsne.pt"))
        self.path("evaluation.json").write_text(json.dumps(
            {"dataset": data.name, "num_classes": data.num_classes,
             "images": {s: len(getattr(data, s)[1]) for s in ("train", "val", "test")},
             "table5": table5, "table7": table7}, indent=1))
        written = report.write(self.dir)
        return ["evaluation.json", "tsne.pt"] + written

    def per_cluster(self, model: RefiNet) -> list[dict]:
        """Table 7: each L2 cluster's head on the validation images of its
        classes (the right cluster given), beside level 1 on the same images."""
        images, labels = self.data().val
        level1 = self.scores()["val"]["probs"]
        rows = []
        for k, (head, leaf) in enumerate(zip(model.heads, model.hierarchy.leaves)):
            where = torch.isin(labels, torch.tensor(leaf)).nonzero().squeeze(1)
            truth = _local_labels(leaf, model.spec.num_classes)[labels[where]]
            probs = loop.predict(lambda x: head(model.trunk(x)).softmax(1), images[where])
            within = level1[where][:, list(leaf)]
            rows.append({"cluster": k + 1, "size": len(leaf), "images": int(where.numel()),
                         "level-2 top-1": topk_accuracy(probs, truth, 1),
                         "level-2 top-5": topk_accuracy(probs, truth, min(5, len(leaf))),
                         "level-1 top-1": topk_accuracy(level1[where], labels[where], 1),
                         "level-1 top-1 within the cluster": topk_accuracy(within, truth, 1)})
        return rows

    def tsne(self, hierarchy: Hierarchy) -> dict[str, Tensor]:
        """Figure 11: a 2-D t-SNE of level 1's validation features, coloured
        by the L2 cluster of each image's true class."""
        from sklearn.manifold import TSNE

        val = self.scores()["val"]
        n = val["labels"].numel()
        generator = torch.Generator().manual_seed(_seed(self.config, "tsne"))
        pick = torch.randperm(n, generator=generator)
        pick = pick[:self.config.tsne_limit].sort().values
        features = val["features"][pick].double().numpy()
        perplexity = float(min(30.0, (len(pick) - 1) / 3))
        embedding = TSNE(2, perplexity=perplexity, init="pca",
                         random_state=_seed(self.config, "tsne")).fit_transform(features)
        clusters = torch.as_tensor(hierarchy.class_to_leaf())[val["labels"][pick]]
        return {"embedding": torch.as_tensor(embedding), "cluster": clusters,
                "labels": val["labels"][pick]}


def _local_labels(leaf: tuple[int, ...], num_classes: int) -> Tensor:
    """(C,) each class's index within ``leaf`` (a head's label), -1 outside it."""
    local = torch.full((num_classes,), -1, dtype=torch.int64)
    local[list(leaf)] = torch.arange(len(leaf))
    return local


def _head_file(leaf: tuple[int, ...]) -> str:
    """The file of the head of a cluster, named by its classes' hash."""
    return f"level2/head-{hashlib.sha256(repr(tuple(leaf)).encode()).hexdigest()[:16]}.pt"
