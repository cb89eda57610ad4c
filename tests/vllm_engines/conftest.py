"""Fixtures for the tests that run real vLLM engines (``nox -s vllm``).

Without vLLM these tests are not collected (the default suite never needs
it), unless ``AIOKVPIPE_REQUIRE_VLLM=1`` (set by ``nox -s vllm``), where a
missing vLLM is an error: that session must not pass by skipping.

Engines are session-scoped and started lazily, all that a test module asks
for at once (they start in parallel): ``vllm serve`` takes ~30-70 s on two
cores. Each is its own process group and is killed at the end.

A killed engine cannot clean up its ``/dev/shm`` entries; ``VllmServer.kill``
removes them. :func:`no_orphaned_shm` checks that it did: after each test that
uses the fleet, and after the fleet stops, no ``/dev/shm`` file an engine was
seen holding may be left that no live process maps or holds open.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiokvpipe.integrations.vllm.serving import VllmServer, shm_files_held

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
        # (device, inode) -> server: /dev/shm files an engine was seen holding.
        self.engine_shm: dict[tuple[int, int], str] = {}

    def note_engine_shm(self) -> None:
        """Record what the live engines hold now (after start, around each test).

        Only files recorded here count as the fleet's: other test runs on the
        machine leave their own short-lived orphans (a killed producer's ring
        before its reader unlinks it), which are not ours to judge or remove.
        """
        for name, server in self.servers.items():
            if server.alive():
                self.engine_shm.update(dict.fromkeys(shm_files_held(server.proc.pid), name))

    def orphaned_shm(self) -> dict[str, str]:
        """``/dev/shm`` names (-> server) an engine held that no live process holds now."""
        held = shm_files_held()
        orphans = {}
        for name in os.listdir("/dev/shm"):
            try:
                st = os.stat(f"/dev/shm/{name}", follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            key = (st.st_dev, st.st_ino)
            if key in self.engine_shm and key not in held:
                orphans[name] = self.engine_shm[key]
        return orphans

    def assert_no_new_orphans(self, known: set[str], what: str, wait: float = 2.0) -> None:
        """Fail if engine files beyond ``known`` stay orphaned for ``wait`` s
        (an exiting process's own clean-up gets that long); remove them first,
        so that a failed run leaves nothing behind either."""
        deadline = time.monotonic() + wait
        while True:
            new = {n: s for n, s in self.orphaned_shm().items() if n not in known}
            if not new or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for name in new:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")
        assert not new, (
            f"{what} left /dev/shm entries of vLLM engines that are gone (name -> "
            f"server; VllmServer.kill/stop must unlink them, removed now): {new}"
        )

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
        self.note_engine_shm()
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
        fleet.note_engine_shm()
        reported = set(fleet.orphaned_shm())  # a test's leftovers already failed that test
        fleet.stop_all()
    fleet.assert_no_new_orphans(reported, "stopping the vLLM fleet")


@pytest.fixture(autouse=True)
def no_orphaned_shm(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test after which a fleet engine's ``/dev/shm`` entry is left unheld.

    The root leak check is off here (``allow_leaks``: engines outlive tests),
    and it only knows aiokvpipe's segments; this one covers what a killed
    engine leaves (torch's segments, multiprocessing's named semaphores).
    Only orphans that appeared during this test count against it.
    """
    if "fleet" not in request.fixturenames:
        yield
        return
    fleet: Fleet = request.getfixturevalue("fleet")
    fleet.note_engine_shm()
    known = set(fleet.orphaned_shm())
    yield
    fleet.note_engine_shm()  # what engines started during the test hold
    fleet.assert_no_new_orphans(known, request.node.nodeid)
