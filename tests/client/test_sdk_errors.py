"""The SDK's error tree and request plumbing, against canned answers (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import client as sdk
from cli.main import main
from tests.infra import free_port


def client_answering(status: int, body: object = None, text: str | None = None, **kw: str):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if text is not None:
            return httpx.Response(status, text=text)
        return httpx.Response(status, json=body)

    return sdk.SlimClient("http://slim.test", transport=httpx.MockTransport(handler), **kw), seen


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "not_found", sdk.NotFound),
        (409, "already_exists", sdk.AlreadyExists),
        (409, "not_ready", sdk.NotReady),
        (409, "conflict", sdk.Conflict),
        (400, "base_mismatch", sdk.BadRequest),
        (403, "forbidden", sdk.Forbidden),
        (413, "blob_too_large", sdk.PayloadTooLarge),
        (422, "validation_error", sdk.ValidationFailed),
        (500, "integrity_error", sdk.IntegrityError),
        (503, "storage_unavailable", sdk.Unavailable),
    ],
)
def test_server_codes_map_to_the_error_tree(status: int, code: str, cls: type) -> None:
    client, _ = client_answering(status, {"code": code, "detail": "what to do next"})
    with client, pytest.raises(cls) as err:
        client.stats()
    assert err.value.code == code and err.value.detail == "what to do next"
    assert err.value.status == status and isinstance(err.value, sdk.ApiError)


def test_an_answer_without_a_code_keeps_its_status() -> None:
    client, _ = client_answering(502, text="<html>bad gateway</html>")
    with client, pytest.raises(sdk.ServerError) as err:
        client.stats()
    assert err.value.code == "http_502" and "bad gateway" in err.value.detail


def test_bearer_key_is_sent_and_401_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIM_API_KEY", raising=False)
    client, seen = client_answering(401, {"code": "unauthorized", "detail": "needs a key"})
    with client, pytest.raises(sdk.Unauthorized) as err:
        client.list_bases()
    assert "authorization" not in seen[0].headers
    assert "SLIM_API_KEY" in err.value.detail

    monkeypatch.setenv("SLIM_API_KEY", "slim_abc_secret")
    client, seen = client_answering(200, {"data": [], "count": 0})
    with client:
        assert client.list_bases() == []
    assert seen[0].headers["authorization"] == "Bearer slim_abc_secret"


def test_names_resolve_to_ids_and_ambiguity_is_an_error() -> None:
    rows = [
        {"id": "0123abcd-0000-4000-8000-000000000001", "name": "sst2", "state": "ready"},
        {"id": "0123abce-0000-4000-8000-000000000002", "name": "mnli", "state": "ready"},
    ]
    client, _ = client_answering(200, {"data": rows, "count": 2})
    with client:
        assert client.get_base("mnli").id == rows[1]["id"]
        assert client.get_base("0123abcd").name == "sst2"
        with pytest.raises(sdk.BadRequest, match="give more characters"):
            client.get_base("0123ab")
        with pytest.raises(sdk.NotFound, match="slim base ls"):
            client.get_base("nope")


def test_unreachable_server_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["ls", "--url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slim: error [connection_error]: cannot reach") and "\n" not in err


def test_push_flags_are_checked_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["push", "d", "--base", "b", "--keep", "0.1", "--min-fidelity", "0.9"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_offline_merge_form_still_works_next_to_the_server_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["merge", "a", "b", "--url", "http://127.0.0.1:9"]) == 2  # no --name
    assert "--name" in capsys.readouterr().err
    assert main(["merge", "base", "d1", "-o", "m.slim", "--name", "x"]) == 2
    assert "offline merge" in capsys.readouterr().err


def test_calibration_lines_end_at_newline_only(tmp_path: Path) -> None:
    """Texts may hold U+0085 / U+2028 (str.splitlines() breaks there; JSON lines do not)."""
    from client import read_calibration

    path = tmp_path / "calib.jsonl"
    texts = ["see you soon \x85\u2028ok", "plain", 'quote " and \\r']
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts) + "\r\n",
        encoding="utf-8",
    )
    assert [e["text"] for e in read_calibration(path)] == texts
