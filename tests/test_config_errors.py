"""Config and command-line errors: every problem named with its file, path or variable, all
at once, and the same whichever route (config, ``-p no:``, ``STEADYTRAIN_DISABLE``) it takes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from distributions import install
from expect import raises

import steadytrain
from steadytrain import ConfigError, Pipeline, Registry, load_config
from steadytrain.cli import main

BUILT_INS = Registry.discover(autoload=False)


def steadytrain_cli(*args, cwd, pythonpath=None):
    """Run the ``steadytrain`` command in a fresh interpreter, as a user's shell does."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "steadytrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# -- files ------------------------------------------------------------------------------


def test_a_duplicate_key_in_a_yaml_plugin_entry_is_refused_naming_the_key_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""\
        plugins:
          - plugin: ema
            decay: 0.9
            every: 2
            decay: 0.99
        """))
    with raises(ConfigError, str(path), "not valid YAML", "found the key 'decay' twice",
                "line 5", "line 3", "remove one"):
        load_config(path, registry=BUILT_INS)


def test_a_duplicate_top_level_key_in_a_yaml_config_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("plugins:\n  - plugin: ema\nplugins:\n  - plugin: grad_norm\n")
    with raises(ConfigError, str(path), "found the key 'plugins' twice", "line 3"):
        load_config(path, registry=BUILT_INS)


NOT_UTF8 = b'[[plugins]]\nplugin = "ema"\n# d\xe9cay tuned by hand\n'


@pytest.mark.parametrize("load", [lambda p: load_config(p, registry=BUILT_INS),
                                  lambda p: Pipeline.from_config(p, registry=BUILT_INS)],
                         ids=["load_config", "Pipeline.from_config"])
def test_a_config_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path, load):
    path = tmp_path / "latin1.toml"
    path.write_bytes(NOT_UTF8)
    with raises(ConfigError, str(path), "not a UTF-8 text file", "byte 0xe9",
                f"offset {NOT_UTF8.index(0xE9)}", "save the config as UTF-8"):
        load(path)


def test_steadytrain_check_of_a_file_that_is_not_utf8_fails_with_a_message_not_a_traceback(
    tmp_path,
):
    path = tmp_path / "latin1.toml"
    path.write_bytes(NOT_UTF8)
    result = steadytrain_cli("check", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"error: {path}: not a UTF-8 text file" in result.stderr
    assert "Traceback" not in result.stderr


# -- all errors at once --------------------------------------------------------------------

MANY_ERRORS = {
    "colour": "blue",
    "finite_check": "sometimes",
    "plugins": [
        {"plugin": "ema", "decay": 1.5},
        {"plugin": "grad_norm", "norm_typ": 2.0},
        {"plugin": "gate_entropy", "weight": -0.5},
        {"plugin": "emma"},
        {"plugin": "guard", "include": "enc.*"},
    ],
}
EVERY_ERROR = [
    "colour: unknown key",
    "finite_check: ",
    "plugins[0].decay: ",
    "plugins[1]: unknown key 'norm_typ' (did you mean 'norm_type'?)",
    "plugins[2].weight: must be >= 0, got a weight that reaches -0.5",
    "plugins[3].plugin: unknown plugin 'emma' (did you mean 'ema'?)",
    "plugins[4].include: ",
]


def test_every_error_of_a_config_is_reported_at_once_with_its_path():
    with raises(ConfigError, *EVERY_ERROR) as info:
        load_config(MANY_ERRORS, registry=BUILT_INS)
    assert len(str(info.value).splitlines()) == len(EVERY_ERROR)


def test_every_error_of_a_config_file_is_reported_at_once_prefixed_with_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(MANY_ERRORS))
    with raises(ConfigError, *(f"{path}: {line}" for line in EVERY_ERROR)):
        load_config(path, registry=BUILT_INS)


# -- disabling ------------------------------------------------------------------------------

ONE_PLUGIN = {"plugins": [{"plugin": "grad_norm", "id": "norms"}]}


def test_steadytrain_disable_naming_nothing_is_refused_by_from_config(monkeypatch):
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "nonexistent")
    with raises(ConfigError, "STEADYTRAIN_DISABLE: 'nonexistent' is neither a plugin nor an "
                "instance id", "`steadytrain plugins` lists the plugins"):
        Pipeline.from_config(ONE_PLUGIN, registry=BUILT_INS)


def test_steadytrain_disable_is_refused_exactly_like_the_disable_argument(monkeypatch):
    with pytest.raises(ConfigError) as by_argument:
        Pipeline.from_config(ONE_PLUGIN, registry=BUILT_INS, disable=["norm"])
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "norm")
    with pytest.raises(ConfigError) as by_environment:
        Pipeline.from_config(ONE_PLUGIN, registry=BUILT_INS)
    assert "did you mean 'norms'" in str(by_argument.value)
    assert str(by_environment.value) == str(by_argument.value).replace(
        "disable:", "STEADYTRAIN_DISABLE:", 1)


def test_steadytrain_disable_leaves_out_an_instance_by_id(monkeypatch):
    monkeypatch.setenv("STEADYTRAIN_DISABLE", " norms ,")
    assert Pipeline.from_config(ONE_PLUGIN, registry=BUILT_INS).plugins == {}


def cli(capsys, *args):
    code = main(["--no-autoload", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_steadytrain_plugins_refuses_steadytrain_disable_naming_nothing_like_p_no(
    capsys, monkeypatch
):
    by_flag = cli(capsys, "-p", "no:nonexistent", "plugins")
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "nonexistent")
    by_environment = cli(capsys, "plugins")
    assert by_flag[0] == 1
    assert by_flag[1] == ""
    assert "'nonexistent' is not a plugin" in by_flag[2]
    assert by_environment == by_flag


def test_steadytrain_disable_hides_a_plugin_from_steadytrain_plugins_like_p_no(
    capsys, monkeypatch
):
    everything = json.loads(cli(capsys, "plugins", "--json")[1])
    by_flag = cli(capsys, "-p", "no:grad_norm", "plugins", "--json")
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "grad_norm")
    by_environment = cli(capsys, "plugins", "--json")
    assert by_environment == by_flag
    names = [row["name"] for row in json.loads(by_flag[1])]
    assert names == [row["name"] for row in everything if row["name"] != "grad_norm"]
    assert "grad_norm" in [row["name"] for row in everything]


def test_steadytrain_disable_hides_a_plugin_from_the_text_listing_like_p_no(
    capsys, monkeypatch
):
    by_flag = cli(capsys, "-p", "no:grad_norm", "plugins")
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "grad_norm")
    assert cli(capsys, "plugins") == by_flag
    assert "grad_norm  (" not in by_flag[1]


# -- the command's output ---------------------------------------------------------------------

BROKEN = '''
raise ImportError("libacme.so: cannot open shared object file")
'''


def test_steadytrain_plugins_json_is_valid_json_on_stdout_while_events_go_to_stderr(
    tmp_path, capsys, monkeypatch
):
    install(tmp_path, "acme-broken", "acme_broken", BROKEN, {"broken": "Broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plugins", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = {row["name"]: row for row in json.loads(out)}
    assert "libacme.so" in rows["broken"]["error"]
    assert "plugin.broken" in err


def write_config(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


GRAD_NORM_OF = """\
    [[plugins]]
    plugin = "grad_norm"
    include = [{pattern!r}]
    """


def test_steadytrain_check_without_a_model_says_the_filters_were_not_resolved(
    tmp_path, capsys
):
    path = write_config(tmp_path, GRAD_NORM_OF.format(pattern="decoder.*"))
    code, out, _ = cli(capsys, "check", str(path))
    assert code == 0
    assert "Filters were not resolved" in out
    assert "--model module:callable" in out


TINY_MODEL = """
import torch


def build():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def not_a_model():
    return "a string"
"""


def test_steadytrain_check_with_a_model_reports_a_pattern_that_matches_nothing(tmp_path):
    (tmp_path / "tiny_model.py").write_text(TINY_MODEL)
    path = write_config(tmp_path, GRAD_NORM_OF.format(pattern="decoder.*"))
    result = steadytrain_cli("check", str(path), "--model", "tiny_model:build", cwd=tmp_path,
                             pythonpath=tmp_path)
    assert result.returncode == 1
    assert "grad_norm.include: pattern 'decoder.*' matches no parameter" in result.stderr
    assert "0.weight" in result.stderr  # the names it could have matched
    assert "Traceback" not in result.stderr


def test_steadytrain_check_with_a_model_resolves_the_filters(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_model.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, GRAD_NORM_OF.format(pattern="0.*"))
    code, out, err = cli(capsys, "check", str(path), "--model", "tiny_model:build")
    assert code == 0, err
    assert "OK with tiny_model:build" in out
    assert "every include/exclude pattern resolved against the model" in out
    assert "Filters were not resolved" not in out


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("tiny_model", "expected module:callable"),
     ("tiny_model:missing", "cannot import it"),
     ("no_such_module:build", "cannot import it"),
     ("tiny_model:not_a_model", "returned a str, not a torch.nn.Module")],
)
def test_steadytrain_check_refuses_a_model_it_cannot_build(
    tmp_path, capsys, monkeypatch, spec, problem
):
    (tmp_path / "tiny_model.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, GRAD_NORM_OF.format(pattern="0.*"))
    code, _, err = cli(capsys, "check", str(path), "--model", spec)
    assert code == 1
    assert f"--model {spec!r}: {problem}" in err


PARAM_GROUPS = """\
    [[plugins]]
    plugin = "grad_norm"

    [[param_groups]]
    name = "no_decay"
    include = ["*.bias"]
    weight_decay = 0.0

    [[param_groups]]
    include = ["*"]
    lr_scale = {lr_scale}
    """


def test_a_config_with_param_groups_passes_steadytrain_check(tmp_path, capsys):
    path = write_config(tmp_path, PARAM_GROUPS.format(lr_scale=0.5))
    code, out, err = cli(capsys, "check", str(path))
    assert code == 0, err
    assert f"{path}: OK, 1 enabled plugin instance(s)" in out


def test_a_bad_param_group_is_reported_by_steadytrain_check_with_its_path(tmp_path, capsys):
    path = write_config(tmp_path, PARAM_GROUPS.format(lr_scale=-1.0))
    code, _, err = cli(capsys, "check", str(path))
    assert code == 1
    assert "param_groups[1].lr_scale: " in err


def test_a_plugin_option_error_is_a_steadytrain_error_naming_the_option():
    from steadytrain.plugins.ema import EMA

    with raises(steadytrain.OptionError, "decay: must be in (0.0, 1.0), got 1.5") as info:
        EMA.Config(decay=1.5)
    assert info.value.option == "decay"
