import json
import tomllib

import attrs
import pytest
import yaml

import steadytrain
from steadytrain import ConfigError, Pipeline, Registry, load_config, schedules, validators
from steadytrain.config import structure_config, unstructure_config


class Decaying(steadytrain.Plugin):
    """Test plugin with validated options."""

    name = "decaying"

    @attrs.frozen
    class Config:
        decay: float = attrs.field(default=0.999, validator=validators.in_range(0, 1))
        every: int = attrs.field(default=1, validator=validators.positive_int)
        mode: str = attrs.field(default="mean", validator=validators.one_of("mean", "sum"))
        buffers: bool = True
        groups: tuple[str, ...] = ("*",)


@pytest.fixture
def registry() -> Registry:
    reg = Registry.discover(autoload=False)
    reg.register(Decaying)
    return reg


def errors_of(raw, registry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure_config(raw, registry=registry)
    return str(info.value).splitlines()


TOML = """
finite_check = "step"

[[plugins]]
plugin = "decaying"
id = "slow"
decay = 0.9999
include = ["encoder.*", "decoder.#.weight"]
exclude = ["*.bias"]

[[plugins]]
plugin = "decaying"
id = "fast"
enabled = false
weight = { kind = "linear_warmup", value = 0.5, warmup_steps = 100 }
mode = "sum"
"""


def test_toml_yaml_json_and_dict_give_the_same_config(tmp_path, registry):
    data = tomllib.loads(TOML)
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "c.json").write_text(json.dumps(data))
    configs = [load_config(data, registry=registry)] + [
        load_config(tmp_path / f"c.{ext}", registry=registry) for ext in ("toml", "yaml", "json")
    ]
    assert all(c == configs[0] for c in configs)
    slow, fast = configs[0].plugins
    assert slow.options == Decaying.Config(decay=0.9999)
    assert slow.exclude == ("*.bias",) and slow.include == ("encoder.*", "decoder.#.weight")
    assert fast.weight == schedules.LinearWarmup(value=0.5, warmup_steps=100)
    assert not fast.enabled and configs[0].finite_check == "step"


def test_config_round_trips(registry):
    config = load_config(tomllib.loads(TOML), registry=registry)
    plain = unstructure_config(config)
    assert structure_config(json.loads(json.dumps(plain)), registry=registry) == config


def test_errors_carry_the_path_and_all_are_reported(registry):
    lines = errors_of(
        {
            "plugins": [
                {"plugin": "decaying", "decay": 1.5},
                {"plugin": "decaying", "id": "b", "decay": "abc", "evry": 2},
                {"plugin": "decayng"},
                {"plugin": "decaying", "id": "c", "buffers": "false"},
                {"plugin": "decaying", "id": "d", "mode": "median"},
            ],
            "finite_chek": "step",
        },
        registry,
    )
    assert "finite_chek: unknown key (did you mean 'finite_check'?); known keys: plugins, " \
           "param_groups, disable, autoload, allow, finite_check" in lines
    assert "plugins[0].decay: must be in (0, 1), got 1.5" in lines
    assert "plugins[1].decay: expected a number, got 'abc'" in lines
    assert any(line.startswith("plugins[1]: unknown key 'evry' (did you mean 'every'?)")
               for line in lines)
    assert any(line.startswith("plugins[2].plugin: unknown plugin 'decayng' (did you mean "
                               "'decaying'?)") for line in lines)
    assert "plugins[3].buffers: expected true or false, got 'false'" in lines
    assert any(line.startswith("plugins[4].mode: must be one of 'mean', 'sum', got 'median'")
               for line in lines)


def test_duplicate_instance_ids_are_an_error(registry):
    lines = errors_of({"plugins": [{"plugin": "decaying"}, {"plugin": "decaying"}]}, registry)
    assert lines == ["plugins[1].id: instance id 'decaying' is already used by plugins[0]; "
                     "give each instance of a plugin its own id"]


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ({"kind": "cosine_warmpu", "value": 1}, "plugins[0].weight.kind: unknown schedule "
         "'cosine_warmpu' (did you mean 'cosine_warmup'"),
        ({"kind": "linear_warmup", "value": 1}, "plugins[0].weight.warmup_steps: missing"),
        ({"kind": "linear_warmup", "value": 1, "warmup_steps": 0},
         "plugins[0].weight.warmup_steps: must be an integer >= 1, got 0"),
        ({"kind": "piecewise", "boundaries": [5, 2], "values": [0, 1, 2]},
         "plugins[0].weight.boundaries: must be strictly increasing"),
        ({"kind": "piecewise", "boundaries": [5], "values": [0]},
         "plugins[0].weight.values: must have one more entry than boundaries"),
        ("heavy", "plugins[0].weight: expected a number or a schedule table"),
        (float("nan"), "plugins[0].weight.value: must be a finite number, got nan"),
    ],
)
def test_bad_weights_are_errors(registry, weight, message):
    lines = errors_of({"plugins": [{"plugin": "decaying", "weight": weight}]}, registry)
    assert any(line.startswith(message) for line in lines), lines


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"plugins": [{"decay": 0.5}]}, "plugins[0].plugin: missing"),
        ({"plugins": ["decaying"]}, "plugins[0]: expected a table with a 'plugin' key"),
        ({"plugins": "decaying"}, "plugins: expected a list of tables"),
        ({"plugins": [{"plugin": 3}]}, "plugins[0].plugin: expected a plugin name, got 3"),
        ([("plugins", [])], "a config is a table with a 'plugins' list, got list"),
        ({"plugins": [{"plugin": "decaying", "on_unmatched": "shout"}]},
         "plugins[0].on_unmatched: must be one of 'error', 'warn', 'ignore', got 'shout'"),
        ({"plugins": [{"plugin": "decaying", "include": [1]}]},
         "plugins[0].include: expected a list of strings"),
        ({"finite_check": "never"},
         "finite_check: must be one of 'auto', 'step', 'log', got 'never'"),
    ],
)
def test_malformed_entries_are_errors(registry, raw, message):
    assert any(line.startswith(message) for line in errors_of(raw, registry))


def test_file_errors_name_the_file(tmp_path, registry):
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the config file"):
        load_config(tmp_path / "missing.toml", registry=registry)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[plugins]\nplugin = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad, registry=registry)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("plugins: [a, b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad_yaml, registry=registry)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"plugins": [}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_config(bad_json, registry=registry)
    ini = tmp_path / "c.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match=r"unknown config format '\.ini'"):
        load_config(ini, registry=registry)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[plugins]]\nplugin = "decaying"\ndecay = 2.0\n')
    with pytest.raises(ConfigError, match=r"wrong\.toml: plugins\[0\]\.decay: must be in"):
        load_config(wrong, registry=registry)


def test_disable_by_config_argument_and_environment(registry, monkeypatch):
    raw = {"plugins": [{"plugin": "decaying", "id": "a"}, {"plugin": "decaying", "id": "b"},
                       {"plugin": "decaying", "id": "c", "enabled": False},
                       {"plugin": "decaying", "id": "d"}],
           "disable": ["a"]}
    assert list(Pipeline.from_config(raw, registry=registry).plugins) == ["b", "d"]
    assert list(Pipeline.from_config(raw, registry=registry, disable=["d"]).plugins) == ["b"]
    monkeypatch.setenv("STEADYTRAIN_DISABLE", "decaying")
    assert list(Pipeline.from_config(raw, registry=registry).plugins) == []
    with pytest.raises(ConfigError, match=r"disable: 'dd' is neither.*did you mean 'd'"):
        Pipeline.from_config(raw, registry=registry, disable=["dd"])


def test_option_table_lists_defaults(registry):
    from steadytrain.config import option_table

    rows = {name: (kind, default) for name, kind, default in option_table(Decaying)}
    assert rows["decay"] == ("float", 0.999)
    assert rows["groups"] == ("tuple[str, ...]", ["*"])
