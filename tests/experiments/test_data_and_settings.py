"""Run configs and the data they name: defaults, the documented split, and every bad input."""

import hashlib
from pydoc_data import topics

import pytest
import torch

import steadytrain
from steadytrain.experiments import load_experiment
from steadytrain.experiments.data import Corpus, load_corpus
from steadytrain.experiments.models import model_options


def load(raw, **kwargs):
    return load_experiment(raw, model_options=model_options, **kwargs)


# -- data -------------------------------------------------------------------------------------


def test_pydoc_is_the_sorted_topics_split_nine_to_one():
    text = b"\n\n".join(topics.topics[k].encode("utf-8") for k in sorted(topics.topics))
    corpus = load_corpus("pydoc")
    cut = int(len(text) * 0.9)
    assert bytes(corpus.train.tolist()) == text[:cut]
    assert bytes(corpus.val.tolist()) == text[cut:]
    assert corpus.sha256 == hashlib.sha256(text).hexdigest()


def test_batches_depend_on_seed_and_step_only_and_come_from_the_training_split():
    corpus = Corpus.from_bytes("abc", bytes(range(256)) * 40)
    first = corpus.batch(7, 0, 4, 9)
    assert first.shape == (4, 10) and first.dtype == torch.int64
    assert torch.equal(first, corpus.batch(7, 0, 4, 9))
    assert not torch.equal(first, corpus.batch(8, 0, 4, 9))
    assert not torch.equal(first, corpus.batch(7, 1, 4, 9))
    train = bytes(corpus.train.tolist())
    for row in first.tolist():
        assert bytes(row) in train  # a contiguous window of the training bytes


def test_validation_windows_are_evenly_spaced_and_do_not_overlap():
    corpus = Corpus.from_bytes("abc", bytes(range(250)) * 4)  # 100 validation bytes
    windows = corpus.validation(3, 9)
    val = corpus.val.tolist()
    assert windows.tolist() == [val[0:10], val[30:40], val[60:70]]
    assert corpus.validation(100, 9).shape == (10, 10)  # no more than fit


def test_a_text_file_or_a_directory_of_txt_files(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_bytes(b"third " * 20)
    (tmp_path / "a.txt").write_bytes(b"first " * 20)
    (tmp_path / "notes.md").write_bytes(b"not text for the corpus")
    corpus = load_corpus(str(tmp_path))
    data = bytes(corpus.train.tolist()) + bytes(corpus.val.tolist())
    assert data == b"\n\n".join([b"first " * 20, b"second " * 20, b"third " * 20])
    single = load_corpus("b.txt", base=tmp_path)  # relative to the config's folder
    assert bytes(single.train.tolist()) + bytes(single.val.tolist()) == b"second " * 20


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("pydocs", r"data.source: 'pydocs' is neither built-in data .*did you mean 'pydoc'"),
        ("missing/corpus.txt", r"nor an existing file or directory .*missing/corpus.txt"),
        ("simulation", r"data.source: 'simulation' is the emulator's data, not text"),
    ],
)
def test_unknown_or_missing_data_is_named(source, message, tmp_path):
    with pytest.raises(steadytrain.ConfigError, match=message):
        load_corpus(source, base=tmp_path)


def test_an_empty_directory_or_too_little_text_is_refused(tmp_path):
    with pytest.raises(steadytrain.ConfigError, match=r"holds no \*.txt file"):
        load_corpus(str(tmp_path))
    (tmp_path / "tiny.txt").write_bytes(b"x" * 50)
    with pytest.raises(steadytrain.ConfigError, match=r"validation split of .* has 5 bytes"):
        load_corpus(str(tmp_path)).require(16)


# -- run configs --------------------------------------------------------------------------------


def test_every_table_is_optional_and_the_pipeline_part_is_the_cores_run_config():
    config = load({})
    assert config.model.name == "gpt" and config.model.options.qk_layernorm is False
    assert config.data.source == "pydoc" and config.train.steps == 300
    assert config.pipeline == steadytrain.RunConfig()
    pipeline = {"plugins": [{"plugin": "z_loss"}], "finite_check": "step",
                "param_groups": [{"include": ["*memory*"], "lr_scale": 0.1}]}
    full = load({"model": {"name": "memory_lm", "gate": "stabilized"},
                 "train": {"lr": 0.3, "betas": [0.9, 0.99]}, **pipeline})
    assert full.model.options.gate == "stabilized"
    assert full.train.betas == (0.9, 0.99)
    assert full.pipeline == steadytrain.load_config(pipeline)
    assert full.pipeline.param_groups == (steadytrain.GroupSpec(include=("*memory*",),
                                                                lr_scale=0.1),)


def test_the_plain_form_identifies_the_run():
    a = load({"train": {"lr": 0.01}, "plugins": [{"plugin": "z_loss"}]})
    assert a.to_dict() == load({"plugins": [{"plugin": "z_loss", "coefficient": 1e-4}]}).to_dict()
    assert a.to_dict() != a.with_overrides(lr=0.02).to_dict()
    assert a.with_disabled(("z_loss",)).to_dict()["disable"] == ["z_loss"]


@pytest.mark.parametrize(
    ("raw", "messages"),
    [
        ({"modle": {}}, ["modle: unknown key (did you mean 'model'?)"]),
        ({"train": {"stpes": 3}}, ["train: unknown key 'stpes' (did you mean 'steps'?)"]),
        ({"train": {"lr": -1}}, ["train.lr: must be a positive number, got -1"]),
        ({"train": {"lr": "fast"}}, ["train.lr: expected a number, got 'fast'"]),
        ({"train": {"optimizer": "adamx"}},
         ["train.optimizer: must be one of 'adamw', 'adam', 'sgd', got 'adamx' (did you mean"]),
        ({"train": {"log_every": 10, "checkpoint_every": 15}},
         ["train.checkpoint_every: must be a multiple of log_every (10), got 15"]),
        ({"train": {"betas": [0.9, 1.5]}}, ["train.betas: must be two numbers in [0, 1)"]),
        ({"data": {"seq_len": 0}}, ["data.seq_len: must be an integer >= 1, got 0"]),
        ({"model": {"name": "gtp"}}, ["model.name: unknown model 'gtp' (did you mean 'gpt'?)"]),
        ({"model": {"widht": 8}}, ["model: unknown key 'widht' (did you mean 'width'?)"]),
        ({"model": {"width": 10, "heads": 4}},
         ["model.width: must be a multiple of heads (4), got 10"]),
        ({"model": {"name": "memory_lm", "gate": "hard"}}, ["model.gate: must be one of"]),
        ({"train": {"lr": 0}, "plugins": [{"plugin": "z_los"}]},
         ["train.lr: must be a positive number", "plugins[0].plugin: unknown plugin 'z_los'"]),
        ({"model": "gpt"}, ["model: expected a table, got 'gpt'"]),
    ],
)
def test_bad_configs_name_the_path_and_report_every_problem(raw, messages):
    with pytest.raises(steadytrain.ConfigError) as info:
        load(raw)
    for message in messages:
        assert message in str(info.value)


def test_a_config_file_that_is_missing_or_does_not_parse_is_named(tmp_path):
    with pytest.raises(steadytrain.ConfigError, match=r"nothing.toml: no such config file"):
        load(tmp_path / "nothing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr = 1\n")
    with pytest.raises(steadytrain.ConfigError, match=r"broken.toml: not valid TOML"):
        load(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = -1\n")
    with pytest.raises(steadytrain.ConfigError, match=r"bad.toml: train.lr: must be a positive"):
        load(bad)


def test_overrides_are_validated_like_the_file():
    with pytest.raises(steadytrain.ConfigError, match=r"train.lr: must be a positive number"):
        load({}).with_overrides(lr=-0.1)
