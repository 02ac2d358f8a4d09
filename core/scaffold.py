"""``steadytrain new-plugin NAME [--dir D]``: write a new plugin distribution to start from.

The layout is the one of the template in ``examples/third_party_plugin``: a ``src``
package holding the plugin class (a Config, one hook), its entry point in
``pyproject.toml``, a test that runs the conformance kit, and a README. The placeholder
technique (the mean square of the selected parameters) installs and passes its tests
as written; replace it with yours.
"""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path
from string import Template
from typing import Any

from ._version import __version__
from .errors import ConfigError
from .registry import Registry

NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "$title, a steadytrain plugin."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["steadytrain>=$core", "torch>=2.6"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The plugin's name in configs is the entry point's name, and equals the class's `name`.
[project.entry-points."steadytrain.plugins"]
$name = "$name:$cls"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''')

MODULE = Template('''\
"""$title: the mean square of the selected parameters (a placeholder: put yours here).

What it does
    Adds ``scale · mean_p(mean(p²))`` over the selected parameters ``p`` to the loss.

When to use it
    Say which instability the technique addresses, and what it costs.

Hyperparameters
    ``scale`` (default 1.0); ``weight`` (the instance weight); ``include`` / ``exclude``
    select parameters by name.

Source
    The paper, document or code the technique comes from.

Caveats
    What can go wrong, and what to watch.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

import steadytrain
from steadytrain.validators import positive


def mean_square(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over *parameters* of the mean of their squares: the math, usable alone."""
    return torch.stack([p.square().mean() for p in parameters]).mean()


class $cls(steadytrain.Plugin):
    """$title: penalize the mean square of the selected parameters."""

    name = "$name"
    requires_core = "$core"

    @attrs.frozen
    class Config:
        scale: float = attrs.field(default=1.0, validator=positive)

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        named = dict(run.named_parameters())
        self.selected = [named[n] for n in self.filter.select(list(named), kind="parameter")]

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        return {"penalty": self.config.scale * mean_square(self.selected)}
''')

TESTS = Template('''\
"""$cls passes steadytrain's conformance kit, and its term is its formula."""

import pytest
import torch

import steadytrain
from $name import $cls, mean_square


def test_conformance(conformance_check):
    conformance_check($cls)


def test_the_term_is_the_scaled_mean_square_of_the_selected_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    pipe = steadytrain.Pipeline([$cls($cls.Config(scale=2.0), include=["weight"])])
    pipe.setup(model, None)
    pipe.before_step()
    loss = pipe.compute_loss(None)
    expected = 2.0 * (model.weight.detach() ** 2).sum() / model.weight.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert mean_square([torch.ones(2), torch.full((3,), 2.0)]).item() == pytest.approx(2.5)
''')

README = Template('''\
# $distribution

$title: a steadytrain plugin, written by `steadytrain new-plugin $name`.

```
pip install -e '.[test]'
pytest                 # the conformance kit, and the test of the formula
```

Use it in a config:

```toml
[[plugins]]
plugin = "$name"
weight = 0.01
scale = 1.0
```

Replace the placeholder technique in `src/$name/__init__.py` and its test in
`tests/test_$name.py`; keep `test_conformance`.
''')


def files(name: str) -> dict[str, str]:
    """The files of a new plugin called *name*, by path relative to its distribution folder."""
    values = {
        "name": name,
        "distribution": name.replace("_", "-"),
        "cls": "".join(part.title() for part in name.split("_") if part),
        "title": name.replace("_", " ").capitalize(),
        "core": ".".join(__version__.split(".")[:2]),
    }
    return {
        "pyproject.toml": PYPROJECT.substitute(values),
        "README.md": README.substitute(values),
        f"src/{name}/__init__.py": MODULE.substitute(values),
        f"tests/test_{name}.py": TESTS.substitute(values),
    }


def new_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write the distribution of a new plugin called *name* into *directory*; return its folder.

    *name* is the plugin's name, its package's name and (with ``-`` for ``_``) its
    distribution's; it must be a lowercase Python identifier that no installed plugin
    has. The folder must not exist yet.
    """
    if not NAME.match(name) or keyword.iskeyword(name):
        raise ConfigError(
            f"new-plugin {name!r}: the name must be a lowercase Python identifier (letters, "
            "digits and _, starting with a letter), such as acme_penalty; prefix it with "
            "your project's name"
        )
    installed = Registry.discover()
    if name in installed:
        raise ConfigError(
            f"new-plugin {name!r}: a plugin of that name is installed "
            f"({installed.entry(name).origin}); configs could not tell the two apart: choose "
            "another name"
        )
    folder = Path(directory) / name.replace("_", "-")
    if folder.exists():
        raise ConfigError(
            f"new-plugin {name!r}: {folder} exists; remove it or choose another --dir"
        )
    for path, text in files(name).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    return folder


def cmd_new_plugin(args: argparse.Namespace) -> int:
    folder = new_plugin(args.name, args.dir)
    print(f"wrote {folder}: cd {folder} && pip install -e '.[test]' && pytest")
    return 0


def add_command(commands: Any) -> None:
    """Add ``new-plugin`` to the ``steadytrain`` command's subcommands."""
    new = commands.add_parser("new-plugin", help="write a new plugin distribution to start from")
    new.add_argument("name")
    new.add_argument("--dir", default=".", help="where to write it (default: here)")
    new.set_defaults(func=cmd_new_plugin)
