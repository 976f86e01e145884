"""Shared fixtures (the builders behind them live in ``helpers.py``): tiny models, the benchmark folder.

Everything here is built in the test process (no downloads, no cached weights) so unit tests run in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crl_exp.models.loading import LoadedModel

from helpers import as_loaded, byte_tokenizer, tiny_gemma3

DATA_DIR = Path(os.environ.get("CRL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))


@pytest.fixture
def tiny_lm() -> LoadedModel:
    return as_loaded(tiny_gemma3())


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny Gemma-3 checkpoint + tokenizer saved as a regular local HF folder."""
    path = tmp_path / "tiny-gemma3"
    tiny_gemma3().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_dir(monkeypatch) -> Path:
    """The benchmark files. Absent, a contributor's run skips these tests with the reason; CI (``CI=true``, what
    ``.ci/run`` runs under) fails instead, so a missing folder can never pass CI silently."""
    if not DATA_DIR.is_dir():
        message = f"benchmark data not found at {DATA_DIR}: set CRL_DATA_DIR to the benchmarks folder"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("CRL_DATA_DIR", str(DATA_DIR))  # the code under test reads the same folder the test checked
    return DATA_DIR


def pytest_collection_modifyitems(config, items):
    """Integration tests (real packaged models) are slow too: ``-m "not slow"`` is the fast unit set; tests that
    read the benchmark files carry the ``data`` marker."""
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.slow)
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


FAST_TIER_COMMANDS = ("git",)  # what a fast test may run in a subprocess: provenance reads the checkout's commit


@pytest.fixture(autouse=True)
def fast_tier_starts_no_subprocess(request, monkeypatch):
    """The fast tier (``-m "not slow"``) must stay fast and self-contained: a test that starts the app, a server or a
    browser in a subprocess carries the ``slow`` marker; otherwise it fails here with the command it tried."""
    if request.node.get_closest_marker("slow"):
        return
    import subprocess

    real = subprocess.Popen

    class FastTierPopen(real):
        def __init__(self, args, *a, **kw):
            program = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
            if program not in FAST_TIER_COMMANDS:
                raise AssertionError(f"a fast-tier test started a subprocess ({args!r}): mark it slow")
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", FastTierPopen)
