"""The summary of one ``bench/gpu_session.sh`` run: ``session.json`` + ``session.md``.

``python bench/session_report.py OUT DEVICE`` reads what the phases left in
OUT (``phases.jsonl``: one line per phase with its exit status and seconds;
``tests.log``; the benchmarks' JSON files) and writes, beside them, the
device, driver, versions and commit, each phase's outcome, the test counts
and the list of result files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resfuse_kernels.bench import common  # noqa: E402


def main(out: Path, device: str) -> int:
    env = common.environment(torch.device(device))
    phases = []
    log = out / "phases.jsonl"
    if log.is_file():
        phases = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    tests = {}
    if (out / "tests.log").is_file():
        text = (out / "tests.log").read_text(errors="replace")
        for word in ("passed", "failed", "skipped", "error"):
            tests[word] = sum(int(n) for n in re.findall(rf"(\d+) {word}", text))
        tests["failures"] = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))[:40]
    files = sorted(p.name for p in out.iterdir()
                   if p.suffix in (".json", ".md", ".log") and not p.name.startswith("session."))
    summary = {"benchmark": "gpu-session", "environment": env, "phases": phases,
               "tests": tests, "files": files}
    common.write_json(out / "session.json", summary)
    v = env["versions"]
    md = [f"# GPU session ({env['device']})", "",
          f"- device {env['device']}, driver {env['driver'] or '-'}; torch {v['torch']} "
          f"(CUDA {v['cuda']}), triton {v['triton']}, python {v['python']}; "
          f"commit {env['git_commit']}; {env['utc']}",
          f"- tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
          f"{tests.get('skipped', 0)} skipped, {tests.get('error', 0)} errors" if tests else
          "- tests: not run", "",
          "| phase | exit | seconds | note |", "|---|---:|---:|---|"]
    for p in phases:
        md.append(f"| {p['phase']} | {p['rc']} | {p['seconds']} | {p.get('note', '')} |")
    md += ["", "Failures: " + (", ".join(tests.get("failures", [])) or "none"), "",
           "Files: " + ", ".join(files)]
    common.write_text(out / "session.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda"))
