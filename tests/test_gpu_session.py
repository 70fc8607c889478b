"""bench/gpu_session.sh's dry run (``--device cpu``): the phases that take
seconds here, end to end, into a session summary (``make gpu-dry-run`` runs
them all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"


def _run(tmp_path, *args, phases="host ops"):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PHASES=phases)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_writes_every_result_and_a_summary(tmp_path):
    done = _run(tmp_path, "--device", "cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    session = json.loads((tmp_path / "session.json").read_text())
    assert [(p["phase"], p["rc"]) for p in session["phases"]] == [("host", 0), ("ops", 0)]
    assert session["environment"]["git_commit"]
    for name in ("host-cpu-default", "host-cpu-torch", "ops-cpu-fused", "ops-cpu-compile"):
        assert (tmp_path / f"{name}.md").is_file()
        assert json.loads((tmp_path / f"{name}.json").read_text())["environment"]["versions"]
    ops = json.loads((tmp_path / "ops-cpu-fused.json").read_text())
    assert {r["provider"] for r in ops["results"]} >= {"eager+graph", "fused:cpu+graph"}
    assert "session.md" in os.listdir(tmp_path)


def test_bad_arguments(tmp_path):
    assert _run(tmp_path, "--device", "tpu").returncode == 2
    assert _run(tmp_path, "--device", "cpu", phases="opps").returncode == 2
    assert _run(tmp_path, "extra").returncode == 2
