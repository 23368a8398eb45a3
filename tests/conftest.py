"""Shared fixtures (keep additive): an S3-compatible server on 127.0.0.1, the root logger."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

# Fixtures shared by several folders (each folder's own fixture of a name takes precedence).
pytest_plugins = ["_support.training_fixtures"]


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """URL of a moto S3 server in a thread on 127.0.0.1 (a free port), for this session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_storage_options(s3_endpoint_url: str) -> dict[str, Any]:
    """s3fs options that reach the loopback server (no environment variables needed)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint_url},
        # Fresh filesystem per test: no listing cache shared across tests.
        "skip_instance_cache": True,
    }


@pytest.fixture
def s3_bucket_url(s3_storage_options: dict[str, Any]) -> str:
    """`s3://<new bucket>/root`: an empty bucket of its own for one test."""
    import s3fs

    bucket = f"test-{secrets.token_hex(4)}"
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.mkdir(bucket)
    return f"s3://{bucket}/root"


@pytest.fixture
def root_logger_restored() -> Iterator[None]:
    """Code under test may configure the root logger (`serve` does, for its process);
    the test process gets its handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
