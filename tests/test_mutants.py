"""The mutation check's snippets still apply: a refactor that moves the code a
mutant plants its bug in must move the snippet too, or ``make mutants``
silently checks less (three snippets went stale that way before this test)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("resfuse_mutants", ROOT / "tests" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutants  # dataclasses look their module up there
_spec.loader.exec_module(mutants)


def test_mutant_ids_unique():
    mutants.check_unique_ids()


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.id)
def test_mutant_applies_exactly_once(m):
    text = (ROOT / m.path).read_text()
    assert mutants.occurrences(text, m.old) == 1, (
        f"{m.id}: its `old` snippet is not found exactly once in {m.path}: fix the snippet")
    assert mutants.occurrences(text.replace(m.old, m.new), m.new) >= 1
