"""Throw-away third-party distributions: a module and its entry points in a folder on sys.path."""

import textwrap
from pathlib import Path


def install(
    root: Path, name: str, module: str, source: str, entry_points: dict[str, str]
) -> Path:
    """Write *module*.py holding *source* and a dist-info for distribution *name* 1.0 whose
    ``steadytrain.plugins`` entry points are *entry_points* (``{name: "attr"}`` of *module*).

    The caller puts *root* on ``sys.path`` (``monkeypatch.syspath_prepend``) or on
    ``PYTHONPATH`` for a subprocess. Returns *root*.
    """
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{ep} = {module}:{attr}\n" for ep, attr in entry_points.items())
    (info / "entry_points.txt").write_text(f"[steadytrain.plugins]\n{lines}")
    return root
