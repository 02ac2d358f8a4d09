"""docs/ecosystem.md and the template walk-through of docs/plugin-authors.md agree with the
code: the tables list what the kit has, the snippets run, the quoted code is the template's."""

import re
import textwrap
from pathlib import Path

import attrs
import pytest
from distributions import install

import steadytrain
from steadytrain import Registry, RegistryError
from steadytrain.registry import ALLOW_ENV, AUTOLOAD_ENV
from steadytrain.scaffold import new_plugin
from steadytrain.testing import CHECKS, Fixture, check_plugin
from steadytrain.trace import TRACE_ENV

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "ecosystem.md").read_text()
GUIDE = (ROOT / "docs" / "plugin-authors.md").read_text()
TEMPLATE = ROOT / "examples" / "third_party_plugin"


def blocks(text: str, language: str, *, dedent: bool = True) -> list[str]:
    """The bodies of the fenced blocks of *language* ("" for none), fences paired in order."""
    found, body, current = [], [], None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            current, body = stripped[3:], []
        elif current is not None and stripped == "```":
            if current == language:
                body = "".join(body)
                found.append(textwrap.dedent(body) if dedent else body)
            current = None
        elif current is not None:
            body.append(line)
    return found


def table(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with *header*."""
    rows = []
    for line in text[text.index(f"| {header} |"):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.split("|")[1:-1]])
    return rows


def table_column(text: str, header: str) -> list[str]:
    return [row[0] for row in table(text, header)]


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start:following if following != -1 else None]


def test_the_checks_table_lists_every_check_in_order():
    assert table_column(PAGE, "check") == list(CHECKS)


def test_the_fixture_table_lists_every_field_with_its_default():
    fields = attrs.fields(Fixture)
    assert table_column(PAGE, "field") == [f.name for f in fields]
    rows = {row[0]: row[1] for row in table(PAGE, "field")}
    for field in fields:
        default = field.default.factory() if isinstance(field.default, attrs.Factory) \
            else field.default
        shown = getattr(default, "__name__", None) or repr(default)
        assert rows[field.name] == shown, field.name


def test_the_environment_variables_are_the_ones_the_code_reads():
    for name in (ALLOW_ENV, AUTOLOAD_ENV, TRACE_ENV):
        assert name in PAGE
    assert set(re.findall(r"STEADYTRAIN_[A-Z_]+", PAGE)) == {ALLOW_ENV, AUTOLOAD_ENV, TRACE_ENV}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_python_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippets = blocks(PAGE, "python")
    assert len(snippets) == 3
    namespaces = [{} for _ in snippets]
    for index, (snippet, namespace) in enumerate(zip(snippets, namespaces, strict=True)):
        exec(compile(snippet, f"ecosystem.md, python block {index + 1}", "exec"), namespace)
    check_plugin(namespaces[0]["LossLog"])  # the first block defines the plugin its test checks
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"step"') == 2


def test_the_requires_core_message_is_the_one_shown(tmp_path, monkeypatch):
    install(tmp_path, "acme", "acme", """
        import steadytrain

        class X(steadytrain.Plugin):
            name = "acme_x"
            requires_core = "0.2"
        """, {"acme_x": "X"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError) as info:
        Registry.discover().get("acme_x")
    shown = re.search(r"fails with `(plugin 'acme_x' .*?)`\.", PAGE, re.DOTALL)[1]
    expected = re.sub(r"\s+", " ", shown).replace("...", "acme_x = 'acme:X'")
    assert str(info.value) == expected
    assert steadytrain.__version__ in expected


def test_the_scaffold_commands_name_the_folder_it_writes(tmp_path):
    (command,) = [b for b in blocks(PAGE, "") if "new-plugin" in b]
    name = re.search(r"new-plugin (\w+)", command)[1]
    folder = new_plugin(name, tmp_path)
    assert f"cd {folder.name} " in command


def test_the_template_walk_through_quotes_the_template():
    walk = section(GUIDE, "## The template, step by step")
    sources = "\n".join(p.read_text() for p in TEMPLATE.rglob("*") if p.suffix in
                        (".py", ".toml"))
    for snippet in blocks(walk, "python", dedent=False) + blocks(walk, "toml")[:1]:
        assert snippet in sources, snippet
    (listed,) = [b for b in blocks(walk, "") if b.startswith("examples/third_party_plugin/")]
    files = {line.strip() for line in listed.splitlines()[1:]}
    assert files == {p.relative_to(TEMPLATE).as_posix() for p in TEMPLATE.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
