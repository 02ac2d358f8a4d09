"""Write docs/hooks.md from steadytrain.hookspecs (tests/test_docs.py checks it is current).

    python docs/make_hook_reference.py
"""

from __future__ import annotations

import inspect
from pathlib import Path

from steadytrain import hookspecs

TARGET = Path(__file__).with_name("hooks.md")


def render() -> str:
    """The hook reference as Markdown: the module's docstring, then one section per hook."""
    parts = [
        "# Hook reference",
        "",
        "Generated from `steadytrain/hookspecs.py` by `docs/make_hook_reference.py`; "
        "do not edit by hand.",
        "",
        inspect.getdoc(hookspecs),
    ]
    for title, names in (("Step hooks", hookspecs.STEP_HOOKS),
                         ("Lifecycle hooks", hookspecs.LIFECYCLE_HOOKS)):
        parts += ["", f"## {title}"]
        for name in names:
            spec = getattr(hookspecs, name)
            signature = str(inspect.signature(spec)).replace("'", "")
            parts += ["", f"### `{name}{signature}`", "", inspect.getdoc(spec)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET}")
