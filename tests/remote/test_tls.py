"""wss://: the server serves TLS with a certificate and key from the command line; clients
trust it through a CA file; a worker runs a workflow over it."""

from __future__ import annotations

import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

import aiki
import aiki.asyncio
from aiki.server import ServerConfig, run_server
from tests.remote.app import remote_sum


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
         str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


async def test_wss_with_a_certificate_and_a_ca_file(
    tmp_path: Path, certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    config = ServerConfig(listen="127.0.0.1:0", store="memory", certfile=str(cert),
                          keyfile=str(key), lease_ttl=2)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(run_server, config, handle_signals=False))
        assert url.startswith("wss://127.0.0.1:")
        async with aiki.connect(url, cafile=str(cert)) as client:
            async with aiki.worker(client, workflows=[remote_sum], id="tls-worker"):
                handle = await remote_sum.enqueue(client, 2)
                assert await handle.wait_for_completion(timeout=30) == 63
        with pytest.raises(aiki.ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
            async with aiki.connect(url):  # the system's CAs do not know this certificate
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


def test_wss_needs_both_a_certificate_and_a_key(tmp_path: Path) -> None:
    with pytest.raises(aiki.ConfigError, match="both a certificate"):
        ServerConfig(certfile="cert.pem").endpoint()
    with pytest.raises(aiki.ConfigError, match="give a certificate"):
        ServerConfig(listen="wss://127.0.0.1:1").endpoint()
    with pytest.raises(aiki.ConfigError, match="cannot load the TLS certificate"):
        ServerConfig(certfile=str(tmp_path / "none.pem"),
                     keyfile=str(tmp_path / "none.key")).transport_settings()


async def test_wss_from_the_asyncio_and_blocking_clients(
    tmp_path: Path, certificate: tuple[Path, Path],
) -> None:
    import aiki.sync
    from tests.remote.test_asyncio_client import asyncio_run

    cert, key = certificate
    config = ServerConfig(listen="127.0.0.1:0", store="memory", certfile=str(cert),
                          keyfile=str(key), lease_ttl=2)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(run_server, config, handle_signals=False))
        async with aiki.connect(url, cafile=str(cert)) as client:
            async with aiki.worker(client, workflows=[remote_sum], id="tls-worker"):

                def blocking() -> int:
                    with aiki.sync.connect(url, cafile=str(cert)) as sync_client:
                        handle = remote_sum.enqueue(sync_client, 3)
                        return handle.wait_for_completion(timeout=30)

                async def in_asyncio() -> int:
                    async with aiki.asyncio.connect(url, cafile=str(cert)) as aio_client:
                        handle = await remote_sum.enqueue(aio_client, 4)
                        return await handle.wait_for_completion(timeout=30)

                assert await trio.to_thread.run_sync(blocking) == 93
                assert await trio.to_thread.run_sync(asyncio_run, in_asyncio()) == 123

        def untrusted() -> None:
            with pytest.raises(aiki.ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
                with aiki.sync.connect(url):  # the system's CAs do not know it
                    pass  # pragma: no cover

        await trio.to_thread.run_sync(untrusted)
        nursery.cancel_scope.cancel()
