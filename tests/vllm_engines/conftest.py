"""Fixtures for the tests that run real vLLM engines (``nox -s vllm``).

Without vLLM these tests are not collected (the default suite never needs
it), unless ``AIOKVPIPE_REQUIRE_VLLM=1`` (set by ``nox -s vllm``), where a
missing vLLM is an error: that session must not pass by skipping.

Engines are session-scoped and started lazily, all that a test module asks
for at once (they start in parallel): ``vllm serve`` takes ~30-70 s on two
cores. Each is its own process group and is killed at the end.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiokvpipe.integrations.vllm.serving import VllmServer

REQUIRE = os.environ.get("AIOKVPIPE_REQUIRE_VLLM") == "1"
# (This folder is not named "vllm": pytest puts tests/ on sys.path, and a
# folder of that name would pass for the package.)
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and REQUIRE:
    raise RuntimeError(
        "AIOKVPIPE_REQUIRE_VLLM=1 but vllm is not importable: install the 'vllm' extra"
    )

collect_ignore_glob = [] if HAVE_VLLM else ["test_*.py"]

if HAVE_VLLM:
    # vLLM and the torch modules it pulls in warn at import time (deprecations
    # that are theirs, not ours); the suite turns warnings into errors, so
    # import them once here with warnings silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import vllm
        import vllm.distributed.kv_transfer.kv_connector.factory
        import vllm.v1.core.kv_cache_manager
        import vllm.v1.request  # noqa: F401

        import aiokvpipe.integrations.vllm.connector  # noqa: F401

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks: the leak check is off (engine processes, logs, clients)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.allow_leaks)  # engine logs and clients outlive a test


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aiokvpipe.integrations.vllm.tiny_model import build_tiny_model

    given = os.environ.get("AIOKVPIPE_TINY_MODEL")
    return build_tiny_model(given or tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def token() -> Iterator[str]:
    """The shared token, in the environment the servers inherit."""
    from aiokvpipe.integrations.vllm.serving import TOKEN_ENV

    old = os.environ.get(TOKEN_ENV)
    value = secrets.token_hex(16)
    os.environ[TOKEN_ENV] = value
    yield value
    if old is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = old


class Fleet:
    """Named vLLM servers, started on demand (in parallel), stopped at session end."""

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model = model
        self.log_dir = log_dir
        self.servers: dict[str, VllmServer] = {}

    def start(self, **specs: str) -> dict[str, VllmServer]:
        """``name=kv_transfer_config_json`` for each server wanted; returns them all."""
        fresh = []
        for name, kv_config in specs.items():
            server = self.servers.get(name)
            if server is None or not server.alive():
                server = VllmServer(name, self.model, kv_config, log_dir=self.log_dir)
                self.servers[name] = server
                fresh.append(server)
        for server in fresh:
            server.wait_ready()
        return {name: self.servers[name] for name in specs}

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def fleet(
    tiny_model: Path, token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    fleet = Fleet(tiny_model, tmp_path_factory.mktemp("vllm-logs"))
    try:
        yield fleet
    finally:
        fleet.stop_all()
