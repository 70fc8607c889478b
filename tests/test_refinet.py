"""RefiNet (resfuse_kernels.refinet): the hierarchy, the networks, the pipeline.

Unit tests compare with hand-computed values or a brute force; the pipeline
runs once on the synthetic shapes x stripes data (a module fixture, about
half a minute on 2 cores) and is then checked end to end (the shapes
recovered, RefiNet-L2 at least as accurate as the flat level 1) and step by
step for resumption.
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from resfuse_kernels.refinet import (affinity, clustering, hierarchy, kmedoids, metrics,
                                     pipeline, synthetic, vgg, vote)
from resfuse_kernels.refinet.model import Level1Spec, RefiNet, soft_weights

# -- affinities ---------------------------------------------------------------


def test_score_affinity_is_eq6_by_hand():
    scores = np.array([[0.7, 0.2, 0.1],     # class 0
                       [0.5, 0.4, 0.1],     # class 0
                       [0.3, 0.6, 0.1],     # class 1
                       [0.0, 0.1, 0.9]])    # class 2
    labels = np.array([0, 0, 1, 2])
    a = affinity.score_affinity(scores, labels)
    # A_01 = (score mass of class-0 images on 1 + of class-1 images on 0) / N1
    assert a[0, 1] == pytest.approx((0.2 + 0.4 + 0.3) / 4)
    assert a[0, 2] == pytest.approx((0.1 + 0.1 + 0.0) / 4)
    assert a[1, 2] == pytest.approx((0.1 + 0.1) / 4)
    assert a[0, 0] == pytest.approx(2 * (0.7 + 0.5) / 4)
    np.testing.assert_allclose(a, a.T)


def test_confusion_affinity_is_eq7_by_hand():
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]]  # top-1 predictions 0 1 1 1 2 0
    labels = np.array([0, 0, 1, 1, 2, 2])
    f = affinity.confusion_matrix(scores.argmax(1), labels, 3)
    np.testing.assert_allclose(f, [[0.5, 0.5, 0], [0, 1, 0], [0.5, 0, 0.5]])
    np.testing.assert_allclose(affinity.confusion_affinity(scores, labels),
                               [[0.5, 0.25, 0.25], [0.25, 1, 0], [0.25, 0, 0.5]])


def test_affinity_bad_input():
    with pytest.raises(ValueError, match="no held-out image"):
        affinity.confusion_affinity(np.eye(3)[[0, 1]], np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        affinity.score_affinity(np.ones((2, 3)) / 3, np.array([0, 3]))
    with pytest.raises(ValueError, match="square"):
        clustering.cluster(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="symmetric"):
        clustering.cluster(np.triu(np.ones((4, 4))), 2)
    with pytest.raises(ValueError, match=r"K must lie in \[2, 4\]"):
        clustering.cluster(np.ones((4, 4)), 5)
    with pytest.raises(ValueError, match="unknown clustering method"):
        clustering.cluster(np.ones((4, 4)), 2, "kmeans")


def test_affinity_to_distance():
    a = np.array([[9.0, 2.0, 1.0], [2.0, 9.0, 0.0], [1.0, 0.0, 9.0]])
    np.testing.assert_allclose(affinity.affinity_to_distance(a),
                               [[0, 0, 0.5], [0, 0, 1], [0.5, 1, 0]])


# -- clusterings ----------------------------------------------------------------


def block_affinity(rng: np.random.Generator, sizes: list[int], inside: float = 1.0,
                   noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled block-structured affinity and its true labels."""
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(truth)
    a = noise * rng.random((truth.size, truth.size))
    a = (a + a.T) / 2 + inside * (truth[:, None] == truth[None, :])
    return a, truth


CLUSTERINGS = ([("spectral", {"assign_labels": a}) for a in clustering.ASSIGN_LABELS]
               + [("agglomerative", {"linkage": l}) for l in clustering.LINKAGES]
               + [("affinity_propagation", {}), ("kmedoids", {})])


@pytest.mark.parametrize("method,options", CLUSTERINGS,
                         ids=[f"{m}-{'-'.join(o.values()) or 'default'}" for m, o in CLUSTERINGS])
def test_clustering_recovers_blocks(method, options, _seed):
    a, truth = block_affinity(np.random.default_rng(_seed), [6, 5, 4, 5])
    labels = clustering.cluster(a, 4, method, seed=0, **options)
    np.testing.assert_array_equal(labels, clustering.canonical(truth))


def _cost(d, medoids):
    return d[:, list(medoids)].min(1).sum()


def test_kmedoids_against_brute_force(_seed):
    rng = np.random.default_rng(_seed)
    for _ in range(20):
        points = rng.normal(size=(9, 2))
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        best = min(_cost(d, m) for m in itertools.combinations(range(9), 3))
        labels, medoids = kmedoids.kmedoids(d, 3)                    # exhaustive: the optimum
        assert _cost(d, medoids) == pytest.approx(best)
        np.testing.assert_array_equal(labels, d[:, medoids].argmin(1))
        _, pam = kmedoids.kmedoids(d, 3, exact_limit=0)              # PAM: swap-optimal
        assert _cost(d, pam) >= best - 1e-12
        for out, into in itertools.product(pam, sorted(set(range(9)) - set(pam))):
            assert _cost(d, (set(pam) - {out}) | {into}) >= _cost(d, pam) - 1e-12
    # Three separated groups: PAM's BUILD + SWAP reach the optimum.
    points = np.concatenate([rng.normal(size=(3, 2)) * 0.1 + c for c in ((0, 0), (5, 0), (0, 5))])
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    labels, pam = kmedoids.kmedoids(d, 3, exact_limit=0)
    assert _cost(d, pam) == pytest.approx(min(_cost(d, m) for m in
                                              itertools.combinations(range(9), 3)))
    np.testing.assert_array_equal(clustering.canonical(labels), np.repeat([0, 1, 2], 3))
    with pytest.raises(ValueError, match="k must lie"):
        kmedoids.kmedoids(d, 10)


def test_affinity_propagation_searches_its_preference(_seed):
    a, truth = block_affinity(np.random.default_rng(_seed), [4, 4, 4, 4, 4, 4], noise=0.3)
    for k in (2, 6, 9):
        assert clustering.affinity_propagation(a, k).max() + 1 == k
    # One bisection step cannot reach a K that its single preference does not give.
    lo, hi = clustering._ap_interval(a)
    count = clustering._ap_count(a, (lo + hi) / 2, 0)[0]
    with pytest.raises(clustering.KNotReached, match="saw"):
        clustering.affinity_propagation(a, count + 1, steps=1)


# -- the hierarchy ---------------------------------------------------------------


def test_hierarchy_split_largest_and_until(_seed):
    rng = np.random.default_rng(_seed)
    # Two super-blocks (10 and 6 classes); the first holds sub-blocks of 6 and 4.
    sub = np.repeat([0, 1, 2, 3], [6, 4, 3, 3])
    a = 0.05 * rng.random((16, 16))
    a = (a + a.T) / 2 + 0.5 * ((sub[:, None] < 2) == (sub[None] < 2)) + (sub[:, None] == sub[None])
    h = hierarchy.Hierarchy.from_labels(clustering.cluster(a, 2))
    assert sorted(len(leaf) for leaf in h.leaves) == [6, 10]
    l3 = hierarchy.split_largest(h, a)
    assert l3.depth == 2
    assert sorted(map(sorted, l3.leaves)) == sorted(
        sorted(np.flatnonzero(sub == s).tolist()) for s in (0, 1)) + [list(range(10, 16))]
    small = hierarchy.split_until(h, a, max_size=4)
    assert max(len(leaf) for leaf in small.leaves) <= 4
    assert {tuple(sorted(leaf)) for leaf in small.leaves} >= {(6, 7, 8, 9)}
    assert sorted(c for leaf in small.leaves for c in leaf) == list(range(16))
    with pytest.raises(ValueError, match="max_size"):
        hierarchy.split_until(h, a, 0)
    with pytest.raises(ValueError, match="exactly once"):
        hierarchy.Hierarchy(((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="not both"):
        hierarchy.Hierarchy(((0, 1), (2, (3,))))


# -- the vote ----------------------------------------------------------------------

GROUPS = [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_vote_majority_and_tie_break():
    probs = torch.tensor([
        # 3 votes for group 1 beat 2 votes with more mass in group 0
        [0.30, 0.25, 0.00, 0.10, 0.09, 0.08, 0.05, 0.07],
        # 2-2-1: group 1's mass (0.41) beats group 0's (0.40): not the lowest id
        [0.20, 0.20, 0.00, 0.21, 0.20, 0.00, 0.19, 0.00],
        # 2-2-1: group 0's mass is larger
        [0.22, 0.20, 0.00, 0.19, 0.19, 0.00, 0.20, 0.00],
    ])
    np.testing.assert_array_equal(vote.vote(probs, GROUPS), [1, 1, 0])
    h = hierarchy.Hierarchy(GROUPS)
    np.testing.assert_array_equal(vote.route(probs, h), [1, 1, 0])
    assert vote.cluster_accuracy(torch.tensor([1, 1, 0]), torch.tensor([3, 0, 1]), h) == \
        pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="softmax"):
        vote.vote(torch.randn(2, 8), GROUPS)


def test_route_descends_the_tree():
    h = hierarchy.Hierarchy((((0, 1), (2, 3)), (4, 5, 6, 7)))
    # Below the root all four classes vote, 2-2, and the mass decides.
    probs = torch.tensor([[0.06, 0.04, 0.3, 0.3, 0.1, 0.1, 0.05, 0.05],   # -> (2, 3)
                          [0.3, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.1],       # -> (4..7)
                          [0.3, 0.3, 0.2, 0.0, 0.05, 0.05, 0.05, 0.05]])  # -> (0, 1)
    np.testing.assert_array_equal(vote.route(probs, h), [1, 2, 0])


def test_topk_counts_ties_against():
    probs = torch.tensor([[0.6, 0.4, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0]])
    assert metrics.topk_accuracy(probs, torch.tensor([3, 1]), 5) == 50.0   # a zero is no hit
    assert metrics.topk_accuracy(probs, torch.tensor([0, 1]), 1) == 50.0   # 0.5 tied: miss
    assert metrics.topk_accuracy(probs, torch.tensor([0, 1]), 2) == 100.0


# -- the networks ----------------------------------------------------------------


class Recorder(nn.Module):
    """A head that records which images (ids in h's first channel) reach it
    and puts all probability on its cluster's first class."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.seen = size, []

    def forward(self, h):
        self.seen.append(h[:, 0, 0, 0].long().tolist())
        return torch.nn.functional.one_hot(torch.zeros(h.shape[0], dtype=torch.long),
                                           self.size).float() * 50


def test_each_image_reaches_its_cluster_head_once():
    spec = Level1Spec(num_classes=8)
    h = hierarchy.Hierarchy(GROUPS)
    heads = [Recorder(len(g)) for g in GROUPS]
    model = RefiNet(spec, spec.build(), h, heads)
    leaf = torch.tensor([2, 0, 0, 1, 2, 0, 1])
    ids = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 4, 2, 2)
    probs = model.mix(ids, nn.functional.one_hot(leaf, 3).float())
    for k, head in enumerate(heads):
        assert head.seen == [torch.nonzero(leaf == k).squeeze(1).tolist()]   # one group call
    first = torch.tensor([GROUPS[k][0] for k in leaf])
    assert torch.allclose(probs.argmax(1).float(), first.float())
    outside = torch.ones_like(probs, dtype=torch.bool)
    for i, k in enumerate(leaf):
        outside[i, GROUPS[k]] = False
    assert (probs[outside] == 0).all()


def test_trunk_runs_once_and_heads_share_the_batch():
    spec = Level1Spec(num_classes=8)
    h = hierarchy.Hierarchy(GROUPS)
    model = RefiNet(spec, spec.build(), h, [spec.new_head(len(g)) for g in GROUPS]).eval()
    calls = {"trunk": [], "heads": [0] * 3}
    model.trunk.register_forward_hook(lambda m, i, o: calls["trunk"].append(i[0].shape[0]))
    for k, head in enumerate(model.heads):
        head.register_forward_hook(lambda m, i, o, k=k: calls["heads"].__setitem__(
            k, calls["heads"][k] + i[0].shape[0]))
    x = torch.randn(9, 3, 32, 32)
    with torch.no_grad():
        probs = model(x)
        assert calls["trunk"] == [9]
        chosen = model.weights(model.trunk(x)).argmax(1)
    assert calls["heads"] == [int((chosen == k).sum()) for k in range(3)]
    torch.testing.assert_close(probs.sum(1), torch.ones(9, dtype=probs.dtype))


def test_soft_mixing():
    mass = torch.tensor([[0.6, 0.37, 0.03], [0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    w = soft_weights(mass, top=2, threshold=0.05)
    torch.testing.assert_close(w, torch.tensor([[0.6 / 0.97, 0.37 / 0.97, 0], [0, 0.625, 0.375],
                                                [1.0, 0, 0]]))
    spec = Level1Spec(num_classes=8)
    h = hierarchy.Hierarchy(GROUPS)
    model = RefiNet(spec, spec.build(), h, [spec.new_head(len(g)) for g in GROUPS],
                    soft=True).eval()
    with torch.no_grad():
        feats = model.trunk(torch.randn(3, 3, 32, 32))
        soft = model.mix(feats, w)
        hard = model.mix(feats, nn.functional.one_hot(torch.tensor([0, 1, 0]), 3).float())
        torch.testing.assert_close(soft.sum(1), torch.ones(3))
        torch.testing.assert_close(soft[2], hard[2])   # a one-hot cluster probability
        assert not torch.allclose(soft[0], hard[0])
        torch.testing.assert_close(model(torch.randn(4, 3, 32, 32)).sum(1), torch.ones(4))


# torchvision's VGG-16: the convs' indices in ``features`` and their widths.
VGG_CONVS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512,
             21: 512, 24: 512, 26: 512, 28: 512}


def test_vgg_has_torchvisions_names_and_shapes():
    with torch.device("meta"):
        plain, bn = vgg.VGG(False, 100).eval(), vgg.VGG(True)
    expected, channels = {}, 3
    for i, c in VGG_CONVS.items():
        expected[f"features.{i}.weight"], expected[f"features.{i}.bias"] = (c, channels, 3, 3), (c,)
        channels = c
    for i, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (100, 4096))):
        expected[f"classifier.{i}.weight"], expected[f"classifier.{i}.bias"] = shape, shape[:1]
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == expected
    assert sum(p.numel() for p in bn.parameters()) == 138_365_992   # torchvision's vgg16_bn
    assert "features.1.running_mean" in bn.state_dict()
    trunk, top = Level1Spec("vgg16", 100).parts(plain)
    convs = [m for m in trunk if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and trunk[-2] is plain.features[21]        # up to conv4_3
    h = trunk(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(h.shape) == (2, 512, 28, 28) and tuple(top(h).shape) == (2, 100)


def test_vgg_input_as_the_paper_and_caffe_want_it():
    from resfuse_kernels.data import normalize

    pixel = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 64, 64)
    trunk, _ = Level1Spec("vgg16", 10, caffe=True, resize=True).parts(vgg.VGG(False, 10))
    caffe, resize = trunk[0], trunk[1]
    out = caffe(normalize(pixel))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-103.939, -116.779, 255 - 123.68]))
    assert tuple(resize(out).shape) == (2, 3, 224, 224)
    assert isinstance(trunk[2], nn.Conv2d)


def test_weights_load_strictly(tmp_path):
    with torch.device("meta"):
        model = vgg.VGG(False, 10)
    path = tmp_path / "bn.pt"
    torch.save({"features.0.weight": torch.zeros(1), "features.1.running_mean": torch.zeros(1)},
               path)
    with pytest.raises(ValueError, match="unexpected keys.*features.1.running_mean.*VGG-16-BN"):
        vgg.load_weights(model, path)
    spec = Level1Spec(num_classes=5)
    net = spec.build()
    state = net.state_dict()
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        vgg.load_weights(spec.build(), path)
    torch.save(state, path)
    fresh = spec.build(num_classes=7, weights=None)
    assert vgg.load_weights(fresh, path, reinit=("fc",)) == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(fresh.conv1.weight, net.conv1.weight)
    with pytest.raises(ValueError, match="fc.weight has shape"):
        vgg.load_weights(spec.build(num_classes=7), path)


def test_synthetic_is_deterministic():
    a, la = synthetic.make_split(2, 16, seed=3)
    b, lb = synthetic.make_split(2, 16, seed=3)
    c, _ = synthetic.make_split(2, 16, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (40, 3, 16, 16) and a.dtype == torch.uint8
    assert synthetic.super_classes()[7] == 1 and synthetic.class_names()[7] == "square/72deg"


# -- the pipeline ------------------------------------------------------------------

# The end-to-end run: the default synthetic run, shorter (fewer K, half the head epochs).
FULL = dict(ks=(2, 4, 6), tsne_limit=300, level2_epochs=4)
# The resumption tests' run: every step, as small as it gets (quality not asserted).
TINY = dict(per_class=8, eval_per_class=4, size=16, level1_epochs=1, level2_epochs=1,
            retrain_epochs=1, ks=(2, 4), tsne_limit=60)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the pipeline runs: on a shared 2-core machine two
    spinning OpenMP threads per process cost several times their work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(path, settings):
    fate = pipeline.Run(pipeline.Config(run=str(path), **settings)).run()
    assert set(fate.values()) == {"ran"}
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    return _run(tmp_path_factory.mktemp("refinet"), FULL)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_thread):
    return _run(tmp_path_factory.mktemp("refinet-tiny"), TINY)


def test_end_to_end_recovers_the_shapes_and_beats_level1(run_dir):
    clusters = json.loads((run_dir / "clusters.json").read_text())
    spectral = clusters["table4"]["spectral (kmeans)"]["eq6"]
    assert spectral["ari"] == 1.0
    assert spectral["cluster_accuracy"] >= 95
    table = json.loads((run_dir / "evaluation.json").read_text())["table5"]
    assert table["RefiNet-L2"]["test top-1"] >= table["flat level 1"]["test top-1"]
    report = (run_dir / "report" / "report.md").read_text()
    for title in ("Table 4", "Figure 9a", "Figure 8", "Tables 5/6", "Table 7", "Figure 11",
                  "triangle/72deg"):
        assert title in report
    for png in ("fig8.png", "fig9a.png", "fig11.png"):
        assert (run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"


def _contents(run_dir, step):
    """What a step wrote: tensors and JSON, compared by value."""
    marker = json.loads((run_dir / f"{step}.done.json").read_text())
    out = {}
    for name in marker["outputs"]:
        path = run_dir / name
        out[name] = (torch.load(path, weights_only=True) if path.suffix == ".pt"
                     else path.read_bytes())
    return out


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("step", pipeline.STEPS)
def test_each_step_resumes(tiny_dir, step, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_dir, copy)
    run = pipeline.Run(pipeline.Config(run=str(copy), **TINY))
    assert set(run.run().values()) == {"skipped"}
    before = _contents(copy, step)
    (copy / f"{step}.done.json").unlink()           # as if stopped inside the step
    fate = run.run()
    assert fate == {s: "ran" if s == step else "skipped" for s in pipeline.STEPS}
    assert _equal(_contents(copy, step), before)


def test_tiny_imagenet_folder_runs_with_words_txt(tmp_path, one_thread):
    from PIL import Image

    root, rng = tmp_path / "tiny", np.random.default_rng(0)
    wnids = [f"n0{i}" for i in range(6)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n"
                                            for i, w in enumerate(wnids)))
    annotations = []
    for i, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        for j in range(4):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / w / "images" / f"{w}_{j}.JPEG")
            Image.fromarray(pixels).save(root / "val" / "images" / f"val_{i}_{j}.JPEG")
            annotations.append(f"val_{i}_{j}.JPEG\t{w}\t0\t0\t64\t64")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations))
    config = pipeline.Config(run=str(tmp_path / "run"), data=str(root), classes=6, arch="small",
                             k=2, ks=(2, 3), level1_epochs=1, level2_epochs=1,
                             retrain_epochs=1, tsne_limit=12)
    pipeline.Run(config).run()
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["class_names"] == [f"thing {i}" for i in range(6)]
    assert report["dataset"] == "tiny-imagenet-6"
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["images"] == {"train": 24, "val": 12, "test": 12}


def test_changed_settings_redo_the_step_and_what_follows(tiny_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_dir, copy)
    config = pipeline.Config(run=str(copy), **{**TINY, "k": 5})
    fate = pipeline.Run(config).run()
    assert fate == {"level1": "skipped", "score": "skipped", "cluster": "ran", "level2": "ran",
                    "evaluate": "ran"}
    assert json.loads((copy / "clusters.json").read_text())["k"] == 5
    assert len(json.loads((copy / "evaluation.json").read_text())["table7"]) == 5
    with pytest.raises(ValueError, match="unknown steps"):
        pipeline.Run(config).run(("train",))
    with pytest.raises(ValueError, match="unknown method"):
        pipeline.Run(pipeline.Config(method="kmeans"))
