"""One error root per package: what a user asked for that cannot be done is one line and exit status 2, and
``--debug`` shows the traceback instead."""

from __future__ import annotations

import pytest

from ppl_model import cli as ppl_cli
from ppl_model.backbones import BackboneError
from ppl_model.config import ConfigError
from ppl_model.data.datasets import DataLayoutError
from ppl_model.errors import PPLError
from ppl_model.imageio import UnreadableImage
from ppl_model.inference.base import BackendError
from ppl_model.inference.export import ExportError
from ppl_model.model_dir import ModelDirError
from ppl_model.training.runner import TrainingError
from worker import cli as worker_cli
from worker.errors import WorkerError
from worker.rescan import RescanError
from worker.settings import SettingsError


def test_every_usage_error_has_its_package_root():
    for error in (BackboneError, ConfigError, DataLayoutError, UnreadableImage, BackendError, ExportError,
                  ModelDirError, TrainingError):
        assert issubclass(error, PPLError) and not issubclass(error, WorkerError), error
    for error in (worker_cli.CliError, RescanError, SettingsError):
        assert issubclass(error, WorkerError) and not issubclass(error, PPLError), error


def test_ppl_reports_one_line_or_the_traceback_with_debug(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    assert ppl_cli.main(["export", "--model", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl export: error: ") and missing in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ModelDirError, match="not found"):
        ppl_cli.main(["--debug", "export", "--model", missing])


def test_ppl_worker_reports_one_line_or_the_traceback_with_debug(monkeypatch, capsys):
    monkeypatch.delenv("PPL_HEARTBEAT_FILE", raising=False)
    assert worker_cli.main(["health"]) == 2
    assert capsys.readouterr().err.startswith("ppl-worker health: error: PPL_HEARTBEAT_FILE")
    with pytest.raises(worker_cli.CliError):
        worker_cli.main(["--debug", "health"])
    monkeypatch.setenv("PPL_BATCH_SIZE", "many")  # a setting that does not parse: the same one-line path
    assert worker_cli.main(["health"]) == 2
    assert "PPL_BATCH_SIZE" in capsys.readouterr().err
