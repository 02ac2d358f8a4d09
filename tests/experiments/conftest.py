"""Fixtures of the tests of ``steadytrain run``, ``compare`` and ``demo``."""

import sys

import pytest
import torch

from steadytrain.cli import main


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """``steadytrain ARGS`` in this process, in *tmp_path*: (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(sys.path))  # --model imports from the folder
    threads = torch.get_num_threads()

    def call(*args):
        try:
            code = main([str(a) for a in args])
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return code, out, err

    return call
