import json
import textwrap

import pytest

import steadytrain
from steadytrain import ConfigError, Pipeline, Registry, RegistryError
from steadytrain.cli import main

PLUGINS = '''
import steadytrain


class Good(steadytrain.Plugin):
    """A working third-party plugin."""

    name = "good"

    @steadytrain.hookimpl
    def before_step(self, ctx):
        pass


class WrongSignature(steadytrain.Plugin):
    name = "wrong_signature"

    @steadytrain.hookimpl
    def before_step(self, context):
        pass


class Misspelled(steadytrain.Plugin):
    name = "misspelled"

    @steadytrain.hookimpl
    def after_backwards(self, ctx):
        pass


class TooNew(steadytrain.Plugin):
    name = "too_new"
    requires_core = "99.0"


def not_a_class():
    return 1
'''


def make_distribution(root, name, version, entry_points):
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[steadytrain.plugins]\n{lines}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    (tmp_path / "acme_plugins.py").write_text(PLUGINS)
    (tmp_path / "exploding.py").write_text("raise ImportError('libfoo.so not found')\n")
    make_distribution(tmp_path, "acme-plugins", "1.2", {
        "good": "acme_plugins:Good",
        "wrong_signature": "acme_plugins:WrongSignature",
        "misspelled": "acme_plugins:Misspelled",
        "too_new": "acme_plugins:TooNew",
        "not_a_class": "acme_plugins:not_a_class",
        "exploding": "exploding:Plugin",
        "twin": "acme_plugins:Good",
    })
    make_distribution(tmp_path, "other-dist", "0.3", {"twin": "acme_plugins:Good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("exploding", "import failed: ImportError: libfoo.so not found"),
        ("not_a_class", "must point to a steadytrain.Plugin subclass"),
        ("wrong_signature", "invalid hook implementation"),
        ("misspelled", "after_backwards"),
        ("too_new", "needs steadytrain >= 99.0"),
        ("twin", "claimed by several distributions: acme-plugins 1.2 (acme_plugins:Good) and "
                 "other-dist 0.3 (acme_plugins:Good)"),
    ],
)
def test_broken_plugins_are_reported_with_their_origin(site, name, problem):
    registry = Registry.discover()
    with pytest.raises(RegistryError) as info:
        registry.get(name)
    message = str(info.value)
    assert problem in message
    if name != "twin":
        assert f"entry point {name} = " in message and "acme-plugins 1.2" in message


def test_broken_plugins_do_not_break_runs_that_do_not_use_them(site):
    registry = Registry.discover()
    pipe = Pipeline.from_config({"plugins": [{"plugin": "good"}, {"plugin": "grad_norm"}]},
                                registry=registry)
    assert list(pipe.plugins) == ["good", "grad_norm"]
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.plugin: plugin 'too_new' .* broken"):
        Pipeline.from_config({"plugins": [{"plugin": "good"}, {"plugin": "too_new"}]},
                             registry=registry)


def test_listing_shows_every_plugin_and_the_broken_ones(site, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "good  (acme-plugins 1.2)" in out and "A working third-party plugin." in out
    assert "BROKEN: import failed: ImportError: libfoo.so not found" in out
    assert "6 broken" in out
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["good"]["hooks"] == ["before_step"] and rows["good"]["error"] is None
    assert rows["grad_norm"]["distribution"] == "steadytrain"


def test_autoload_off_reads_only_the_built_in_plugins(site, monkeypatch):
    assert "good" in Registry.discover()
    assert "good" not in Registry.discover(autoload=False)
    assert "grad_norm" in Registry.discover(autoload=False)
    monkeypatch.setenv("STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "good" not in Registry.discover()


def test_autoload_false_in_a_config_file_ignores_third_party_plugins(site, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('autoload = false\n[[plugins]]\nplugin = "good"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: plugins\[0\]\.plugin: unknown plugin"):
        Pipeline.from_config(config)
    config.write_text('[[plugins]]\nplugin = "good"\n')
    assert list(Pipeline.from_config(config).plugins) == ["good"]


def test_in_process_registration():
    class Notebook(steadytrain.Plugin):
        name = "notebook"

    class Impostor(steadytrain.Plugin):
        name = "grad_norm"

    registry = Registry.discover(autoload=False)
    registry.register(Notebook)
    assert registry.get("notebook") is Notebook
    assert registry.entry("notebook").origin == "registered in-process"
    with pytest.raises(RegistryError, match="taken by entry point grad_norm"):
        registry.register(Impostor)
    with pytest.raises(RegistryError, match=r"cannot register 'x'.*Plugin subclass"):
        registry.register(object, name="x")
    with pytest.raises(RegistryError, match=r"unknown plugin 'notebok' \(did you mean 'notebook'"):
        registry.get("notebok")


def test_cli_config_check_and_disable(site, tmp_path, capsys):
    assert main(["config", "grad_norm"]) == 0
    assert "norm_type = 2.0    # float" in capsys.readouterr().out
    good = tmp_path / "ok.toml"
    good.write_text(textwrap.dedent("""
        [[plugins]]
        plugin = "good"
        [[plugins]]
        plugin = "grad_norm"
        """))
    assert main(["check", str(good)]) == 0
    assert "2 enabled plugin instance(s)" in capsys.readouterr().out
    assert main(["-p", "no:grad_norm", "check", str(good)]) == 0
    assert "1 enabled plugin instance(s)" in capsys.readouterr().out
    assert main(["--no-autoload", "check", str(good)]) == 1
    assert "unknown plugin 'good'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[[plugins]]\nplugin = "grad_norm"\nnorm_type = -2\n')
    assert main(["check", str(bad)]) == 1
    assert "bad.toml: plugins[0].norm_type: must be a number > 0 (or inf for the max-abs " \
           "norm), got -2" in capsys.readouterr().err
    assert main(["-p", "grad_norm", "plugins"]) == 1
    assert "only -p no:NAME" in capsys.readouterr().err
