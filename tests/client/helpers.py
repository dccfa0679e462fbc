"""Shared by the client and dashboard tests: a real ``slim serve`` process, the ``slim`` command
as a user runs it, Prometheus counters, and a tiny instantiable BERT (base + fine-tunes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.infra import AUTH_HEADERS, TEST_ADMIN_KEY, add_api_key, free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    """A running ``slim serve``: its URL, data directory and an admin HTTP client."""

    url: str
    data_dir: Path
    client: httpx.Client
    process: subprocess.Popen[bytes]

    def env(self, key: str | None = TEST_ADMIN_KEY) -> dict[str, str]:
        """Environment for a ``slim`` client talking to this server (``SLIM_URL``, key)."""
        env = {**os.environ, "SLIM_URL": self.url}
        env.pop("SLIM_API_KEY", None)
        if key is not None:
            env["SLIM_API_KEY"] = key
        return env

    def create_key(self, role: str, namespace: str = "default") -> str:
        """A new API key, made in the server's database (as ``slim keys create`` does)."""
        from runtime.process import Runtime
        from runtime.settings import Settings

        runtime = Runtime.from_settings(Settings(data_dir=self.data_dir), migrate_schema=False)
        try:
            return add_api_key(runtime.sessions, namespace, role)
        finally:
            runtime.close()


@contextmanager
def serve(data_dir: Path, **env: str) -> Iterator[Server]:
    """``slim serve`` (embedded: SQLite, local blobs, worker thread) on a free port, started
    with the test admin key; stopped with SIGTERM at exit."""
    port = free_port()
    full_env = {
        **os.environ,
        "SLIM_BOOTSTRAP_KEY": TEST_ADMIN_KEY,
        "SLIM_WORKER_POLL_SECONDS": "0.1",
        "SLIM_WORKER_HEARTBEAT_SECONDS": "0.5",
        **env,
    }
    log = (data_dir.parent / f"{data_dir.name}-serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=120, headers=AUTH_HEADERS)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"slim serve did not start: {Path(log.name).read_text()}")
            time.sleep(0.2)
        yield Server(url, data_dir, client, process)
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def slim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``slim`` command as a user would (a new Python process)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def counter(client: httpx.Client, method: str, route: str, status: int) -> float:
    """``slim_http_requests_total`` for one method, route template and status (0 if none)."""
    text = client.get("/metrics").text
    pattern = re.compile(r"^slim_http_requests_total\{(.*)\} (\S+)$", re.MULTILINE)
    for labels, value in pattern.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found == {"method": method, "route": route, "status": str(status)}:
            return float(value)
    return 0.0


def settled_counter(
    client: httpx.Client, method: str, route: str, status: int, expected: float
) -> float:
    """:func:`counter`, given up to 30 s to reach ``expected``: a request is counted once its
    answer has gone out, a moment after the client holds the last byte. Returns the value
    (which may overshoot ``expected``: the caller asserts equality)."""
    deadline = time.monotonic() + 30
    while (value := counter(client, method, route, status)) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return value


CKPT_FILE_ROUTE = "/v1/checkpoints/{checkpoint_id}/files/{path:path}"
BASE_FILE_ROUTE = "/v1/bases/{base_id}/files/{path:path}"

#: Tokenizer files of the real base that the tiny BERT reuses (same vocabulary).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def tiny_bert(root: Path, n_finetunes: int = 2) -> tuple[Path, list[Path]]:
    """A tiny BERT base (``BertModel``, hidden 32, 2 layers, the real base's vocabulary) and
    ``n_finetunes`` sequence classifiers fine-tuned from it (sparse nudges + a head): real
    models the worker instantiates for the fidelity evaluation, in milliseconds."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from tests.fixtures import base_dir

    real = base_dir()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    base = BertModel(config)
    base_path = root / "tiny-base"
    base.save_pretrained(base_path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (real / name).is_file():
            shutil.copy(real / name, base_path / name)
    outs = []
    for i in range(n_finetunes):
        gen = torch.Generator().manual_seed(100 + i)
        ft = BertForSequenceClassification(BertConfig(**config.to_dict(), num_labels=2))
        ft.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.bert.parameters():
                nudge = torch.randn(p.shape, generator=gen) * 0.002
                big = (torch.rand(p.shape, generator=gen) < 0.03) * torch.randn(
                    p.shape, generator=gen
                )
                p.add_(nudge + big * 0.2)
            ft.classifier.weight.mul_(10)  # confident outputs: pruning shows in the fidelity
        path = root / f"tiny-ft{i + 1}"
        ft.save_pretrained(path, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (real / name).is_file():
                shutil.copy(real / name, path / name)
        outs.append(path)
    return base_path, outs


def write_calibration(path: Path, n: int = 12) -> Path:
    """``n`` calibration lines (text + label) from the real task's validation split."""
    from tests.fixtures import calibration_jsonl

    return calibration_jsonl(path, n=n)
