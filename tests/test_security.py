"""Config files and checkpoints are data: loading them never runs code.

YAML is read with a safe loader, no value is evaluated, and every ``torch.load`` passes
``weights_only=True`` (no pickled objects). Each attempt below would create a file if it
ran; none may.
"""

import ast
import io
import pickle
from pathlib import Path

import pytest
import torch
from expect import raises

from steadytrain import CheckpointError, ConfigError, Pipeline, SteadytrainError, load_config

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates the file *path* (what a malicious pickle would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    pytest.importorskip("yaml")
    marker = tmp_path / "ran"
    config = tmp_path / "run.yaml"
    config.write_text(f'plugins:\n  - !!python/object/apply:pathlib.Path.touch ["{marker}"]\n')
    with raises(ConfigError, str(config), "not valid YAML"):
        load_config(config)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["weight", "decay"])
def test_values_that_look_like_code_are_not_evaluated(tmp_path, key):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or 0.5"
    with raises(ConfigError, f"plugins[0].{key}", "expected a number"):
        load_config({"plugins": [{"plugin": "ema", key: code}]})
    assert not marker.exists()


def test_a_string_option_stays_a_string(tmp_path):
    code = "__import__('os').getcwd()"
    config = load_config({"plugins": [{"plugin": "corrector_penalty", "source": code}]})
    assert config.plugins[0].options.source == code


def test_a_pickled_object_in_a_statistics_file_is_refused(tmp_path):
    marker, stats = tmp_path / "ran", tmp_path / "std.pt"
    torch.save({"ice": Payload(marker)}, stats)
    model = torch.nn.Linear(2, 2)
    pipe = Pipeline.from_config({"plugins": [{"plugin": "corrector_penalty",
                                              "std_file": str(stats)}]})
    # A SteadytrainError naming the instance; the file's objects were never rebuilt.
    with raises(SteadytrainError, "corrector_penalty", "Weights only load failed"):
        pipe.setup(model, None)
    assert not marker.exists()


def test_a_checkpoint_holding_a_pickled_object_is_refused_before_it_reaches_the_pipeline(
    tmp_path,
):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"format": 1, "payload": Payload(marker)}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)
    assert not marker.exists()


def test_state_that_weights_only_loading_would_refuse_is_refused_when_saved(model):
    class Keeps:
        name = "keeps"

        def state_dict(self):
            return {"object": Payload("unused")}

        def load_state_dict(self, state):
            pass

    pipe = Pipeline()
    pipe.register(Keeps(), name="keeps")
    pipe.setup(model, None)
    with raises(CheckpointError, "plugin instance 'keeps'", "torch.load(weights_only=True)"):
        pipe.state_dict()


def _calls(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_no_library_code_evaluates_unpickles_or_loads_yaml_unsafely():
    problems = []
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        where = path.relative_to(ROOT)
        for node, owner, name in _calls(path):
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec") and isinstance(node.func, ast.Name):
                problems.append(f"{where}:{node.lineno}: {name}()")
            elif owner in ("pickle", "marshal", "dill") and name in ("load", "loads"):
                problems.append(f"{where}:{node.lineno}: {owner}.{name}()")
            elif owner == "torch" and name == "load" and not (
                isinstance(keywords.get("weights_only"), ast.Constant)
                and keywords["weights_only"].value is True
            ):
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load") \
                    and "Loader" not in keywords:
                problems.append(f"{where}:{node.lineno}: yaml.{name} without a safe Loader")
    assert not problems, problems
