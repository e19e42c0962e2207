"""Shared test fixtures: tiny models, image folders, and the machine's Redis (helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import PHOTOS, make_folders_dataset, tiny_model_config


@pytest.fixture
def folders_dataset(tmp_path: Path) -> Path:
    return make_folders_dataset(tmp_path / "data")


@pytest.fixture
def paired_dataset(tmp_path: Path) -> Path:
    return make_folders_dataset(tmp_path / "paired", paired=True)


@pytest.fixture(scope="session")
def photos() -> Path:
    if not PHOTOS.is_dir():
        pytest.fail(f"the repository's sample photos are missing: {PHOTOS}")
    return PHOTOS


# A test that uses one of these fixtures talks to a real PostgreSQL or Redis: the `integration` layer.
SERVICE_FIXTURES = frozenset({"pg_server_url", "database_url", "empty_database_url", "engine", "module_engine",
                              "redis_server", "redis_url"})


def pytest_collection_modifyitems(config, items):
    """Layers: tests that use PostgreSQL or Redis are marked ``integration`` (``make test-fast`` leaves them
    out). GPU tests run where CUDA is present and are skipped, saying why, everywhere else (CI has no GPU)."""
    import torch

    integration = pytest.mark.integration
    skip = pytest.mark.skip(reason="needs a CUDA device, and there is none here (see docs/PERFORMANCE.md)")
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(integration)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-initialised model directory (no ONNX file): what the worker tests serve."""
    import torch

    from ppl_model.detector import build_detector
    from ppl_model.model_dir import save_model_dir

    torch.manual_seed(1)
    detector = build_detector(tiny_model_config(finetune="full"))
    path = tmp_path_factory.mktemp("served") / "model"
    save_model_dir(detector, path, threshold=0.5)
    return path


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> Path:
    """A tiny random-initialised model directory with its model.onnx."""
    import torch

    from ppl_model.detector import build_detector
    from ppl_model.inference.export import export_onnx
    from ppl_model.model_dir import save_model_dir

    torch.manual_seed(0)
    detector = build_detector(tiny_model_config())
    with torch.no_grad():
        for name, p in detector.named_parameters():
            if "lora_B" in name or "head" in name:
                p.normal_(0, 0.3)  # make every part of the graph matter to the outputs
    path = tmp_path_factory.mktemp("exported") / "model"
    save_model_dir(detector, path)
    export_onnx(path)
    return path


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_TEST_DB = 13  # the tests' own database number on the machine's Redis, flushed around each test


def _redis_client():
    import redis

    return redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_TEST_DB, socket_connect_timeout=2)


def _redis_answers() -> bool:
    import redis

    try:
        return bool(_redis_client().ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> None:
    """The machine's Redis, started if it is down; the tests fail (never skip) when there is none."""
    import shutil
    import subprocess
    import time

    if _redis_answers():
        return
    server = shutil.which("redis-server")
    if server:
        subprocess.run([server, "--daemonize", "yes", "--bind", REDIS_HOST, "--port", str(REDIS_PORT), "--save", "",
                        "--appendonly", "no"], check=False, timeout=30)
        for _ in range(30):
            if _redis_answers():
                return
            time.sleep(0.5)
    pytest.fail(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT} and could not be started "
                "(run `make services`, or install it: sudo apt-get install -y redis-server)")


@pytest.fixture
def redis_url(redis_server) -> str:
    client = _redis_client()
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    client.flushdb()
