"""Checks every built-in plugin must pass, run over the registry rather than per plugin."""

import ast
import inspect
import io
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import attrs
import pytest

import steadytrain
from steadytrain import Registry, load_config, unstructure_config
from steadytrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = Registry.discover(autoload=False)
BUILT_INS = REGISTRY.names()
HEADINGS = ("What it does", "When to use it", "Hyperparameters", "Source", "Caveats")


@pytest.fixture(params=BUILT_INS)
def plugin(request):
    return REGISTRY.get(request.param)


def test_built_ins_are_registered_through_entry_points():
    assert "grad_norm" in BUILT_INS
    for name in BUILT_INS:
        entry = REGISTRY.entry(name)
        assert entry.distribution == "steadytrain" and entry.error is None, entry.error


def test_plugin_is_documented(plugin):
    assert plugin.summary(), f"{plugin.name}: the class needs a one-line docstring"
    module_doc = inspect.getmodule(plugin).__doc__ or ""
    missing = [h for h in HEADINGS if h not in module_doc]
    assert not missing, f"{plugin.name}: module docstring lacks {missing}"


def test_defaults_construct_and_round_trip_through_a_config(plugin):
    assert attrs.has(plugin.Config)
    default = plugin.Config()
    config = load_config({"plugins": [{"plugin": plugin.name, "id": "x", "weight": 0.5}]},
                         registry=REGISTRY)
    assert config.plugins[0].options == default
    assert load_config(unstructure_config(config), registry=REGISTRY) == config


def test_cli_prints_a_config_that_loads_to_the_defaults(plugin):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["config", plugin.name]) == 0
    config = load_config(tomllib.loads(out.getvalue()), registry=REGISTRY)
    assert config.plugins[0].options == plugin.Config()


def _imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


#: The core's subpackages: public, and built on the framework modules, never under them.
SUBPACKAGES = sorted(p.parent.name for p in (ROOT / "core").glob("*/__init__.py"))


def test_plugins_use_only_the_public_api():
    public = {f"steadytrain.{name}" for name in [*steadytrain.__all__, *SUBPACKAGES]}
    for path in (ROOT / "plugins").rglob("*.py"):
        for name in _imports(path):
            if not name.startswith("steadytrain.") or name == "steadytrain.plugins":
                continue
            head = ".".join(name.split(".")[:2])
            assert head in public, f"{path.relative_to(ROOT)} imports {name}, not public API"


def test_core_never_imports_plugins():
    for path in (ROOT / "core").rglob("*.py"):
        assert not any(n.startswith("steadytrain.plugins") for n in _imports(path)), path


def test_framework_modules_never_import_the_subpackages():
    # cli.py and __main__.py are the command-line application, above everything else.
    framework = [p for p in (ROOT / "core").glob("*.py")
                 if p.name not in ("cli.py", "__main__.py")]
    for path in framework:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "") if node.level else (node.module or "").removeprefix(
                    "steadytrain.")
                names = [module] if module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("steadytrain.") for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in SUBPACKAGES, f"{path.name} imports {name}"
