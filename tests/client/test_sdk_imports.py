"""The SDK is a package of its own: importing it loads neither torch nor a server package."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "sqlalchemy", "fastapi", "core", "storage", "service", "worker", "cli")


def test_import_client_leaves_torch_and_the_server_out() -> None:
    code = (
        "import sys, client, client.client, client.transfer; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_public_names_come_from_the_package() -> None:
    import client

    assert client.SlimClient.__module__ == "client.client"
    assert issubclass(client.JobFailed, client.ApiError)
    assert set(client.__all__) <= set(dir(client))
