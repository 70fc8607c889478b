"""The paper's Table 3: parameters of each network (time per epoch: issue 5)."""

from __future__ import annotations

from .. import models

MODELS = ("resnet19", "highway19", "resfuse19", "resnet25", "resfuse25")


def parameter_rows(num_classes: int = 100) -> list[dict]:
    """One row per model: our count, the paper's where it gives one."""
    rows = []
    for name in MODELS:
        model = models.build(name, num_classes=num_classes)
        count = sum(p.numel() for p in model.parameters())
        paper = models.PAPER_PARAMETERS.get(name) if num_classes == 100 else None
        rows.append({"model": name, "parameters": count, "paper": paper})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | parameters | paper (Table 3) | match |", "|---|---:|---:|---|"]
    for row in rows:
        paper = row["paper"]
        match = "-" if paper is None else ("yes" if paper == row["parameters"] else "NO")
        lines.append(f"| {row['model']} | {row['parameters']:,} | "
                     f"{'-' if paper is None else f'{paper:,}'} | {match} |")
    return "\n".join(lines)


def main(num_classes: int = 100) -> int:
    rows = parameter_rows(num_classes)
    print(f"Table 3 parameters, {num_classes} classes, 3x64x64 input")
    print(markdown(rows))
    return int(any(r["paper"] is not None and r["paper"] != r["parameters"] for r in rows))
