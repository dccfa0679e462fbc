"""The SDK is a package of its own: importing it loads neither torch nor a server package; of
the core it reads only the torch-free definitions it shares with the server."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "sqlalchemy", "fastapi", "storage", "service", "worker", "runtime", "cli")
#: The core modules the SDK may load: torch-free, shared with the server (one definition).
SHARED = {"core", "core.params", "core.files", "core.errors", "core.peft_config"}


def test_import_client_leaves_torch_and_the_server_out() -> None:
    code = (
        "import sys, client, client.client, client.transfer; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'core'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy, core = out.stdout.strip().splitlines()
    assert heavy == "[]"
    assert set(eval(core)) <= SHARED, core


def test_the_public_names_come_from_the_package() -> None:
    import client

    assert client.SlimClient.__module__ == "client.client"
    assert issubclass(client.JobFailed, client.ApiError)
    assert set(client.__all__) <= set(dir(client))
