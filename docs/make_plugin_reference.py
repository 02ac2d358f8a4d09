"""Write docs/plugins.md from the built-in plugins (tests/test_docs.py checks it is current).

    python docs/make_plugin_reference.py
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from steadytrain import Registry
from steadytrain.config import option_table
from steadytrain.hook_table import implemented_hooks

TARGET = Path(__file__).with_name("plugins.md")


def _markdown(docstring: str) -> list[str]:
    """The module docstring after its first line, its headings turned into Markdown ones.

    A docstring section is a heading line followed by lines indented by four spaces.
    """
    lines = []
    for line in docstring.splitlines()[1:]:
        if line and not line.startswith(" "):
            lines += [f"### {line.strip()}", ""]
        else:
            lines.append(line[4:])
    return lines


def render() -> str:
    """One section per built-in plugin: summary, hooks, options, and its module docstring."""
    registry = Registry.discover(autoload=False)
    parts = [
        "# Built-in plugins",
        "",
        "Generated from the plugin modules by `docs/make_plugin_reference.py`; do not edit "
        "by hand. `steadytrain config NAME` prints the same options as TOML.",
        "",
    ]
    parts += [f"- [`{name}`](#{name}): {registry.get(name).summary()}" for name in
              registry.names()]
    for name in registry.names():
        plugin = registry.get(name)
        module = inspect.getmodule(plugin)
        parts += [
            "", f"## {name}", "",
            f"{plugin.summary()} (`{module.__name__}.{plugin.__qualname__}`; hooks: "
            f"{', '.join(implemented_hooks(plugin))})",
            "", "| option | type | default |", "| --- | --- | --- |",
        ]
        parts += [f"| `{opt}` | `{kind}` | `{json.dumps(default)}` |"
                  for opt, kind, default in option_table(plugin)]
        parts += ["", *_markdown(inspect.getdoc(module) or "")]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET}")
