"""The allowlist: with one, only the third-party plugins it names are read, and the others'
code is never imported; a name in it that matches nothing is an error."""

import json
import os
import subprocess
import sys

import pytest
from distributions import install
from expect import raises

from steadytrain import ConfigError, Pipeline, Registry, RegistryError
from steadytrain.registry import ALLOW_ENV, AUTOLOAD_ENV

MODULE = """
import pathlib
import steadytrain

pathlib.Path(__file__).with_name("{module}.imported").touch()  # import-time code runs


class Penalty(steadytrain.Plugin):
    name = "{plugin}"

    @steadytrain.hookimpl
    def before_step(self, ctx):
        pass
"""

PLUGINS = {"acme-one": ("acme_one", "one_penalty"), "acme-two": ("acme_two", "two_penalty")}


@pytest.fixture
def site(tmp_path, monkeypatch):
    for distribution, (module, plugin) in PLUGINS.items():
        install(tmp_path, distribution, module, MODULE.format(module=module, plugin=plugin),
                {plugin: "Penalty"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return tmp_path


def third_party(registry):
    return {n for n in registry.names() if registry.entry(n).distribution != "steadytrain"}


def test_without_an_allowlist_autoload_reads_every_plugin(site):
    assert third_party(Registry.discover()) == {"one_penalty", "two_penalty"}


@pytest.mark.parametrize(("allow", "read"), [
    (["one_penalty"], {"one_penalty"}),                       # a plugin name
    (["acme-two"], {"two_penalty"}),                          # a distribution name
    (["Acme_Two"], {"two_penalty"}),                          # spelled another way
    (["one_penalty", "acme-two"], {"one_penalty", "two_penalty"}),
])
def test_an_allowlist_reads_only_what_it_names(site, allow, read):
    registry = Registry.discover(allow=allow)
    assert third_party(registry) == read
    assert "grad_norm" in registry  # the built-in plugins are always there


@pytest.mark.parametrize("autoload", [None, True, False])
def test_the_allowlist_overrides_autoload(site, autoload):
    assert third_party(Registry.discover(autoload=autoload, allow=["acme-one"])) == {
        "one_penalty"}


def test_the_environment_variable_adds_to_the_allowlist(site, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, " acme-one , ")
    assert third_party(Registry.discover()) == {"one_penalty"}
    assert third_party(Registry.discover(allow=["two_penalty"])) == {"one_penalty",
                                                                      "two_penalty"}


def test_autoload_off_plus_an_allowlist_through_the_environment(site, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert third_party(Registry.discover()) == set()
    monkeypatch.setenv(ALLOW_ENV, "one_penalty")
    assert third_party(Registry.discover()) == {"one_penalty"}


def test_a_name_the_allowlist_cannot_find_is_an_error_with_suggestions(site):
    with raises(RegistryError, f"allow / {ALLOW_ENV}", "'acme-on' is neither an installed "
                "distribution nor a plugin", "did you mean", "'acme-one'"):
        Registry.discover(allow=["acme-on"])


def test_the_config_key_allow_restricts_the_plugins_a_config_may_use(site, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('allow = ["acme-one"]\n\n[[plugins]]\nplugin = "two_penalty"\n')
    with raises(ConfigError, f"{config}: plugins[0].plugin: unknown plugin 'two_penalty'"):
        Pipeline.from_config(config)
    config.write_text('allow = ["acme-one"]\n\n[[plugins]]\nplugin = "one_penalty"\n'
                      '\n[[plugins]]\nplugin = "grad_norm"\n')
    assert list(Pipeline.from_config(config).plugins) == ["one_penalty", "grad_norm"]


def test_a_config_allowlist_naming_nothing_installed_is_a_config_error(site):
    with raises(ConfigError, "'acme-three' is neither an installed distribution"):
        Pipeline.from_config({"allow": ["acme-three"], "plugins": []})


def test_a_plugin_left_out_by_the_allowlist_is_never_imported(site):
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, ALLOW_ENV: "acme-one"}
    env.pop(AUTOLOAD_ENV, None)
    listing = subprocess.run([sys.executable, "-m", "steadytrain", "plugins", "--json"],
                             capture_output=True, text=True, env=env, check=True).stdout
    names = {row["name"] for row in json.loads(listing)}
    assert "one_penalty" in names and "two_penalty" not in names
    assert (site / "acme_one.imported").exists()  # listing imports what it lists
    assert not (site / "acme_two.imported").exists()
