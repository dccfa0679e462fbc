"""What a Hub push means, below the routes: upload modes, commit lines, operations, model
cards, calibration files, signed upload URLs, repository names."""

from __future__ import annotations

import base64
import json

import pytest

from core.errors import InvalidCalibration, InvalidPath
from service import hub, hub_write
from service.hub_write import BadCommit, BadRepoName, BadUploadUrl, CommitPayload, UploadGrant


def _line(key: str, **value: object) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


def test_upload_modes_follow_the_hubs_rule() -> None:
    assert hub_write.upload_mode("config.json", 500, b'{"a": 1}') == "regular"
    assert hub_write.upload_mode("model.safetensors", 100, b"\x08\x00") == "lfs"
    assert hub_write.upload_mode("notes.txt", hub_write.REGULAR_MAX_BYTES + 1, b"x") == "lfs"
    assert hub_write.upload_mode("blob.dat", 20, b"ab\0cd") == "lfs"  # binary sample


def test_commit_lines_are_read_into_a_payload() -> None:
    payload = CommitPayload()
    assert (
        hub_write.parse_commit_line(_line("header", summary="s", description="d"), payload) is None
    )
    inline = hub_write.parse_commit_line(
        _line("file", content=base64.b64encode(b"hello").decode(), path="a/b.txt"), payload
    )
    assert inline is not None and inline.content == b"hello" and inline.path == "a/b.txt"
    oid = "ab" * 32
    hub_write.parse_commit_line(_line("lfsFile", path="m.safetensors", oid=oid, size=9), payload)
    hub_write.parse_commit_line(_line("deletedFile", path="old.txt"), payload)
    hub_write.parse_commit_line(_line("deletedFolder", path="logs/"), payload)
    assert payload.message == "s\n\nd"
    assert payload.added["m.safetensors"] == (oid, 9, None)
    assert payload.added["a/b.txt"][1] == 5
    assert payload.deleted_files == ["old.txt"] and payload.deleted_folders == ["logs"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{not json", BadCommit),
        (b"[1, 2]", BadCommit),
        (_line("file", content="aGk=", path="x"), BadCommit),  # before the header
    ],
)
def test_bad_first_lines_are_refused(line: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        hub_write.parse_commit_line(line, CommitPayload())


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (_line("file", content="not base64!", path="x"), BadCommit),
        (_line("file", content="aGk=", path="../escape"), InvalidPath),
        (_line("file", content="aGk=", path="/abs"), InvalidPath),
        (_line("lfsFile", path="m", oid="xyz"), BadCommit),
        (_line("lfsFile", path="m", oid="ab" * 32, algo="md5"), BadCommit),
        (_line("lfsFile", path="m", oid="ab" * 32, size=-1), BadCommit),
        (_line("rename", path="m"), BadCommit),
    ],
)
def test_bad_operations_are_refused(line: bytes, error: type[Exception]) -> None:
    payload = CommitPayload()
    hub_write.parse_commit_line(_line("header", summary="s"), payload)
    with pytest.raises(error):
        hub_write.parse_commit_line(line, payload)


def test_a_path_added_twice_is_refused() -> None:
    payload = CommitPayload()
    hub_write.parse_commit_line(_line("header", summary="s"), payload)
    hub_write.parse_commit_line(_line("file", content="aGk=", path="x"), payload)
    with pytest.raises(BadCommit):
        hub_write.parse_commit_line(_line("file", content="aGk=", path="x"), payload)


def test_operations_apply_to_the_parents_files() -> None:
    parent = {"a": ("1", 1, "k1"), "logs/x": ("2", 1, "k2"), "logs/y": ("3", 1, "k3")}
    payload = CommitPayload(seen_header=True)
    payload.added["b"] = ("4", 1, None)
    payload.deleted_folders.append("logs")
    assert hub_write.apply_operations(parent, payload, commit="c") == {
        "a": ("1", 1, "k1"),
        "b": ("4", 1, None),
    }
    missing = CommitPayload(seen_header=True, deleted_files=["nope"])
    with pytest.raises(hub.EntryNotFound) as info:
        hub_write.apply_operations(parent, missing, commit="c" * 40)
    assert info.value.commit == "c" * 40 and "doesn't exist" in info.value.detail


def test_model_cards_name_their_base() -> None:
    card = b"---\nlicense: mit\nbase_model: team/minilm\n---\n# hi\n"
    assert hub_write.card_base_model(card) == "team/minilm"
    assert hub_write.card_base_model(b"---\nbase_model:\n- a\n- b\n---\n") == "a"
    assert hub_write.card_base_model(b"# no metadata\n") is None
    assert hub_write.card_base_model(b"---\n: : bad\n---\n") is None
    assert hub_write.card_base_model(None) is None
    config = json.dumps({"base_model_name_or_path": "minilm", "r": 8}).encode()
    assert hub_write.adapter_base_model(config) == "minilm"
    assert hub_write.adapter_base_model(b"not json") is None


def test_validate_card_answers_errors_and_warnings() -> None:
    assert hub_write.validate_card("---\nlicense: mit\n---\n") == ([], [])
    errors, warnings = hub_write.validate_card("# nothing\n")
    assert errors == [] and warnings
    errors, _ = hub_write.validate_card("---\n- a list\n---\n")
    assert errors and "mapping" in errors[0]["message"]
    errors, _ = hub_write.validate_card("---\nbase_model: 3\n---\n")
    assert errors


def test_calibration_files_are_read_line_by_line() -> None:
    data = b'{"text": "good", "label": 1}\n\n"bare text"\n{"text": "x", "label": "no"}\n'
    examples = hub_write.read_calibration(data)
    assert [(e.text, e.label) for e in examples] == [("good", 1), ("bare text", None), ("x", None)]
    with pytest.raises(InvalidCalibration):
        hub_write.read_calibration(b'{"no_text": 1}\n')
    policy = hub_write.Policy.from_row({"min_fidelity": 0.98})
    params = hub_write.policy_params(policy, examples)
    assert params is not None and params.min_fidelity == 0.98 and str(params.method) == "auto"
    assert hub_write.policy_params(policy, ()) is None  # no data: nothing lossy


def test_upload_urls_are_signed_and_expire() -> None:
    grant = UploadGrant("ab" * 32, 10, 2_000_000_000, "abc")
    sig = hub_write.sign(b"secret", grant)
    hub_write.check_grant(b"secret", grant, sig, now=1_000)
    with pytest.raises(BadUploadUrl):
        hub_write.check_grant(b"other", grant, sig, now=1_000)
    with pytest.raises(BadUploadUrl):  # another size under the same signature
        hub_write.check_grant(b"secret", UploadGrant("ab" * 32, 11, 2_000_000_000, "abc"), sig)
    with pytest.raises(BadUploadUrl):
        hub_write.check_grant(b"secret", grant, sig, now=3_000_000_000)
    assert hub_write.part_count(10, 4) == 3 and hub_write.part_count(0, 4) == 1


@pytest.mark.parametrize("name", ["ok", "my-model.v2", "A_b-3"])
def test_good_repo_names(name: str) -> None:
    assert hub_write.check_repo_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", "x-", "a--b", "a..b", "a/b", "résumé", "x" * 97, "api", "resolve", "m.git"]
)
def test_bad_repo_names(name: str) -> None:
    with pytest.raises(BadRepoName):
        hub_write.check_repo_name(name)
