"""RefiNet's reports in the paper's shape, from a run directory.

Reads ``clusters.json``, ``evaluation.json`` and ``tsne.pt`` and writes
``report/``: ``report.json`` (every number), ``report.md`` (the tables and
figures below) and the PNGs (matplotlib, Agg):

* Table 4   cluster accuracy of each clustering, on eq. 6 and on eq. 7
* Figure 9a cluster accuracy against K (``fig9a.png``)
* Figure 8  the clusters with their class names (L2, and L3's split; ``fig8.png``)
* Tables 5/6 flat level 1, RefiNet-L2, L2 + retrain, L3, soft: val/test top-1/top-5
* Table 7   each L2 cluster's size and level-2 accuracy beside level 1's
* Figure 11 t-SNE of level 1's validation features by cluster (``fig11.png``)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .hierarchy import Hierarchy


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cluster_names(hierarchy: Hierarchy) -> list[str]:
    """A name per leaf: top-level clusters 1..K, their parts 2.1, 2.2, ..."""
    names: list[str] = []

    def walk(node: tuple, prefix: str) -> None:
        if isinstance(node[0], int):
            names.append(prefix)
            return
        for i, child in enumerate(node):
            walk(child, f"{prefix}.{i + 1}" if prefix else str(i + 1))
    walk(hierarchy.tree, "")
    return names


def table4(clusters: dict) -> str:
    affinities = sorted(clusters["affinities"])
    rows = []
    for method, results in clusters["table4"].items():
        row = [method]
        for name in affinities:
            r = results[name]
            if "error" in r:
                row.append("K not reached")
            else:
                row.append(f"{r['cluster_accuracy']:.2f}"
                           + (f" (ARI {r['ari']:.2f})" if "ari" in r else ""))
        rows.append(row)
    headers = ["clustering"] + [f"{n} cluster accuracy %" for n in affinities]
    return _table(headers, rows)


def figure8_text(clusters: dict) -> str:
    names = clusters["class_names"]
    out = []
    for title, tree in clusters["hierarchies"].items():
        h = Hierarchy(tree)
        out.append(f"**{title}** ({len(h.leaves)} clusters)\n")
        for label, leaf in zip(cluster_names(h), h.leaves):
            out.append(f"- C{label} ({len(leaf)}): " + ", ".join(names[c] for c in leaf))
        out.append("")
    return "\n".join(out)


def tables56(evaluation: dict) -> str:
    columns = ["val top-1", "val top-5", "test top-1", "test top-5",
               "val cluster accuracy", "test cluster accuracy"]
    rows = [[name] + [r.get(c, "-") for c in columns] for name, r in evaluation["table5"].items()]
    return _table(["model"] + [c + " %" for c in columns], rows)


def table7(evaluation: dict) -> str:
    columns = ["size", "images", "level-2 top-1", "level-2 top-5", "level-1 top-1",
               "level-1 top-1 within the cluster"]
    rows = [[f"C{r['cluster']}"] + [r[c] for c in columns] for r in evaluation["table7"]]
    return _table(["cluster"] + columns, rows)


def _plots(out: Path, clusters: dict, tsne: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    accuracy = {int(k): v for k, v in clusters["figure9a"].items()}   # JSON keys are strings
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sorted(accuracy), [accuracy[k] for k in sorted(accuracy)], "o-")
    ax.set(xlabel="number of clusters K", ylabel="cluster accuracy (%)",
           title=f"Figure 9a: {clusters['method']} on {clusters['affinity']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig9a.png", dpi=120)
    plt.close(fig)
    written.append("fig9a.png")

    names = clusters["class_names"]
    trees = list(clusters["hierarchies"].items())
    columns = sum(len(Hierarchy(t).leaves) for _, t in trees)
    longest = max(len(leaf) for _, t in trees for leaf in Hierarchy(t).leaves)
    fig, axes = plt.subplots(1, len(trees), figsize=(max(6, 1.7 * columns),
                                                      1 + 0.2 * longest), squeeze=False)
    for ax, (title, tree) in zip(axes[0], trees):
        h = Hierarchy(tree)
        ax.axis("off")
        ax.set_title(f"{title}: {len(h.leaves)} clusters")
        for i, (label, leaf) in enumerate(zip(cluster_names(h), h.leaves)):
            text = f"C{label} ({len(leaf)})\n" + "\n".join(names[c][:18] for c in leaf)
            ax.text(i / len(h.leaves), 1, text, va="top", ha="left", fontsize=7,
                    transform=ax.transAxes, family="monospace")
    fig.suptitle("Figure 8: the learned clusters")
    fig.savefig(out / "fig8.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append("fig8.png")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    e, c = tsne["embedding"].numpy(), tsne["cluster"].numpy()
    for k in sorted(set(c.tolist())):
        ax.scatter(e[c == k, 0], e[c == k, 1], s=6, label=f"C{k + 1}")
    ax.legend(markerscale=2, fontsize=7)
    ax.set(title="Figure 11: t-SNE of level-1 features by cluster", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "fig11.png", dpi=120)
    plt.close(fig)
    written.append("fig11.png")
    return written


def write(run: Path | str) -> list[str]:
    """Write ``run/report/``; returns the files written, relative to ``run``."""
    run = Path(run)
    clusters = json.loads((run / "clusters.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    tsne = torch.load(run / "tsne.pt", weights_only=True)
    out = run / "report"
    out.mkdir(exist_ok=True)
    written = _plots(out, clusters, tsne)
    sizes = ", ".join(f"{n} {s}" for s, n in evaluation["images"].items())
    md = [f"# RefiNet on {evaluation['dataset']}", "",
          f"{evaluation['num_classes']} classes; images: {sizes}. Clusters from "
          f"{clusters['method']} on {clusters['affinity']}, K = {clusters['k']}.", "",
          "## Table 4: cluster accuracy on the validation images, K = "
          f"{clusters['k']}", "",
          "% of validation images whose true class's cluster is the top-5 vote's "
          "cluster" + (" (ARI: against the true super-classes)"
                       if "true_super_classes" in clusters else "") + ".", "",
          table4(clusters), "",
          "## Figure 9a: cluster accuracy against K", "", "![Figure 9a](fig9a.png)", "",
          "## Figure 8: the clusters", "", figure8_text(clusters),
          "![Figure 8](fig8.png)", "",
          "## Tables 5/6: model accuracies (%)", "",
          "Cluster accuracy: how often the model's routing picks the true class's "
          "cluster (hard variants).", "", tables56(evaluation), "",
          "## Table 7: level-2 networks on their own clusters' validation images (%)", "",
          "Level 2 picks among its cluster's classes; level 1 among all classes, and "
          "(last column) among the cluster's classes.", "", table7(evaluation), "",
          "## Figure 11: t-SNE of level-1 validation features, coloured by cluster", "",
          "![Figure 11](fig11.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(
        {"dataset": evaluation["dataset"], "table4": clusters["table4"],
         "figure9a": clusters["figure9a"], "hierarchies": clusters["hierarchies"],
         "class_names": clusters["class_names"], "tables5_6": evaluation["table5"],
         "table7": evaluation["table7"]}, indent=1))
    return [f"report/{f}" for f in written + ["report.md", "report.json"]]
