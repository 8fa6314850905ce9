"""The README's library example runs as written (on memory:// instead of the SQLite file)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs() -> None:
    text = README.read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'stateline.open("sqlite:///./stateline.db")' in block
    code = block.replace('stateline.open("sqlite:///./stateline.db")', 'stateline.open("memory://")')
    namespace: dict[str, object] = {"print": lambda *a, **k: None}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README's example
    t = namespace["t"]
    assert t.docs.get("budget/b").value == {"left": 10}  # type: ignore[attr-defined]
    assert t.cases.verify("case-1").ok  # type: ignore[attr-defined]
