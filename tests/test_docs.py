"""The documents that promise behaviour are checked against the code."""

import importlib.util
import re
from pathlib import Path

import torch

from steadytrain import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_reference_is_generated_from_the_hookspecs():
    generator = load_script(ROOT / "docs" / "make_hook_reference.py")
    assert (ROOT / "docs" / "hooks.md").read_text() == generator.render(), (
        "docs/hooks.md is stale: run python docs/make_hook_reference.py"
    )


def test_every_hook_has_a_docstring_and_keyword_arguments_only():
    for name in hookspecs.HOOK_NAMES:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, name
        assert spec.__code__.co_argcount == 1 and spec.__code__.co_varnames[0] in ("ctx", "run")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = code_blocks(readme, "bash")[0].strip().splitlines()
    assert len(quick) == 2
    test_command = quick[1].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    for part in test_command.split("&&"):
        command = part.strip().split()[-1]
        assert command in ci, f"{command!r} of the README's test command is not in .ci/run"


def test_readme_training_loop_runs():
    (loop,) = [b for b in code_blocks((ROOT / "README.md").read_text(), "python")
               if "Pipeline" in b]
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(loop, "README.md", "exec"), namespace)
    assert namespace["pipe"].run.step == 10


def test_plugin_reference_is_generated_from_the_plugins():
    generator = load_script(ROOT / "docs" / "make_plugin_reference.py")
    assert (ROOT / "docs" / "plugins.md").read_text() == generator.render(), (
        "docs/plugins.md is stale: run python docs/make_plugin_reference.py"
    )


def test_readme_lists_every_built_in_plugin():
    from steadytrain import Registry

    readme = (ROOT / "README.md").read_text()
    missing = [n for n in Registry.discover(autoload=False).names() if f"`{n}`" not in readme]
    assert not missing, f"README.md does not mention {missing}"
