"""A run's outputs: the JSONL log, the Table 2 summary, the Figure 4 plot.

A run folder holds ``log.jsonl`` (first line ``{"type": "config", ...}``,
then one ``{"type": "epoch", ...}`` line per epoch and a ``{"type":
"test", ...}`` line at the end), ``summary.json`` and ``summary.md`` (the
run's row of Table 2), ``loss.png`` (its training loss per epoch),
``split.json`` and the checkpoints. :func:`merge` puts several runs into one
Table 2 and one Figure 4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

LOG, SUMMARY_JSON, SUMMARY_MD, LOSS_PNG, SPLIT = (
    "log.jsonl", "summary.json", "summary.md", "loss.png", "split.json")

# The paper's Table 2 (ImageNet-100, 90 epochs): accuracy in %, val top-1,
# val top-5, test top-1; "ResNet*" is the classical 34-layer ResNet.
PAPER_TABLE2 = {
    "resnet34": (57.70, 79.86, 57.55),
    "resnet19": (60.20, 82.84, 60.18),
    "highway19": (62.50, 84.30, 62.48),
    "resfuse19": (60.48, 83.24, 60.36),
    "resnet25": (60.06, 82.42, 60.06),
    "resfuse25": (60.32, 82.74, 60.16),
}
TABLE2_MODELS = tuple(PAPER_TABLE2)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")


class JsonlLog:
    """Append-only JSON lines, flushed line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, epochs_done: int) -> None:
        """Drop epoch and test lines past ``epochs_done`` completed epochs (a
        resumed run logs those epochs again)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_log(self.path)
                if r.get("type") not in ("epoch", "test") or
                (r["type"] == "epoch" and r["epoch"] <= epochs_done)]
        self.path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_records(run_dir: Path) -> tuple[dict, list[dict], Optional[dict]]:
    path = Path(run_dir) / LOG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {LOG}; is it a run folder?")
    records = read_log(path)
    if not records or records[0].get("type") != "config":
        raise ValueError(f"{path}: the first line is not the run's config")
    epochs = [r for r in records if r.get("type") == "epoch"]
    tests = [r for r in records if r.get("type") == "test"]
    return records[0], epochs, tests[-1] if tests else None


def _percent(err: Optional[float]) -> Optional[float]:
    return None if err is None or math.isnan(err) else round(100 * (1 - err), 2)


def table2_row(run_dir: Path) -> dict:
    """A run's Table 2 row: accuracies in % from its last epoch's validation
    and its test evaluation (errors in the JSON too)."""
    config, epochs, test = _run_records(run_dir)
    last = epochs[-1] if epochs else None
    val = last["val"] if last else {}
    tst = test["test"] if test else {}
    name = config["config"]["model"]
    return {"run": str(run_dir), "model": name, "fused": config["config"]["fused"],
            "parameters": config["parameters"], "epochs": last["epoch"] if last else 0,
            "val_top1_acc": _percent(val.get("top1_err")),
            "val_top5_acc": _percent(val.get("top5_err")),
            "test_top1_acc": _percent(tst.get("top1_err")),
            "test_top5_acc": _percent(tst.get("top5_err")),
            "val_top1_err": val.get("top1_err"), "val_top5_err": val.get("top5_err"),
            "test_top1_err": tst.get("top1_err"), "test_top5_err": tst.get("top5_err"),
            "paper": PAPER_TABLE2.get(name), "data": config["data"]["source"]}


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def table2_markdown(rows: Sequence[dict]) -> str:
    """Rows in the shape of the paper's Table 2, with its figures beside ours."""
    out = ["| model | fused | parameters | epochs | val top-1 | val top-5 | test top-1 "
           "| test top-5 | paper val top-1 | paper val top-5 | paper test top-1 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = r["paper"] or (None, None, None)
        out.append(f"| {r['model']} | {'yes' if r['fused'] else 'no'} | {r['parameters']:,} | "
                   f"{r['epochs']} | {_cell(r['val_top1_acc'])} | {_cell(r['val_top5_acc'])} | "
                   f"{_cell(r['test_top1_acc'])} | {_cell(r['test_top5_acc'])} | "
                   + " | ".join(_cell(p) for p in paper) + " |")
    data = sorted({r["data"] for r in rows})
    out += ["", "Accuracy in % (100 - error), as the paper's Table 2: validation after the "
            "last epoch, test (the other half of the official validation set) evaluated once "
            "at the end. Paper: ImageNet-100, 90 epochs; its figures are for comparison only, "
            "ours are whatever the data below gives.", "",
            "Data: " + "; ".join(data)]
    return "\n".join(out) + "\n"


def plot_losses(run_dirs: Iterable[Path], path: Path, title: str = "Training loss") -> Path:
    """Figure 4: the mean training loss per epoch of each run, in one figure (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run_dir in run_dirs:
        config, epochs, _ = _run_records(Path(run_dir))
        c = config["config"]
        label = f"{c['model']}{' (fused)' if c['fused'] else ''}"
        ax.plot([e["epoch"] for e in epochs], [e["train"]["loss"] for e in epochs],
                marker="o" if len(epochs) < 20 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_summary(run_dir: Path, extra: dict) -> dict:
    """``summary.json`` (the Table 2 row plus ``extra``), ``summary.md`` and ``loss.png``."""
    row = table2_row(run_dir)
    summary = {**row, **extra}
    write_json(run_dir / SUMMARY_JSON, summary)
    (run_dir / SUMMARY_MD).write_text(f"# {row['model']}: Table 2 row\n\n"
                                      + table2_markdown([row]))
    plot_losses([run_dir], run_dir / LOSS_PNG, f"Training loss, {row['model']}")
    return summary


def merge(run_dirs: Sequence[Path], out: Path) -> dict:
    """Table 2 (``table2.json``, ``table2.md``) and Figure 4 (``loss.png``) of
    several runs, in the paper's model order where it names them."""
    if not run_dirs:
        raise ValueError("no run folders given")
    order = {m: i for i, m in enumerate(TABLE2_MODELS)}
    rows = sorted((table2_row(Path(d)) for d in run_dirs),
                  key=lambda r: (order.get(r["model"], len(order)), r["model"], r["fused"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "table2.json", {"rows": rows})
    (out / "table2.md").write_text("# Table 2: top-1 / top-5 accuracy\n\n"
                                   + table2_markdown(rows))
    plot_losses([Path(r["run"]) for r in rows], out / LOSS_PNG,
                "Figure 4: training loss per epoch")
    return {"rows": rows, "files": [str(out / n) for n in ("table2.json", "table2.md",
                                                          LOSS_PNG)]}
