"""``repo.get_base`` / ``repo.get_checkpoint``: an id, else a name in the caller's namespace.

The one lookup rule every route uses (issue 19: the API answered "checkpoint sentiment does
not exist" for a name the CLI accepts).
"""

from __future__ import annotations

import pytest
from storage_helpers import Database

from storage import repo
from storage.errors import NotFound
from storage.models import BaseState


def _ready_base(database: Database, name: str, namespace: str = "default") -> str:
    with database.sessions.begin() as session:
        base = repo.create_base(session, name=name, namespace=namespace)
        base.state = BaseState.READY
        session.flush()
        return base.id


def _checkpoint(database: Database, name: str, base_id: str, namespace: str = "default") -> str:
    with database.sessions.begin() as session:
        return repo.create_checkpoint(
            session, name=name, base_id=base_id, method="nps", namespace=namespace
        ).id


def test_a_checkpoint_is_found_by_id_or_by_name_in_its_namespace(database: Database) -> None:
    base_id = _ready_base(database, "minilm")
    ckpt_id = _checkpoint(database, "sentiment", base_id)
    other_base = _ready_base(database, "minilm", namespace="team-b")
    other_id = _checkpoint(database, "sentiment", other_base, namespace="team-b")
    with database.sessions() as session:
        assert repo.get_checkpoint(session, ckpt_id, namespace="default").id == ckpt_id
        assert repo.get_checkpoint(session, "sentiment", namespace="default").id == ckpt_id
        assert repo.get_checkpoint(session, "sentiment", namespace="team-b").id == other_id
        with pytest.raises(NotFound, match="id or name 'nope' in namespace 'default'"):
            repo.get_checkpoint(session, "nope", namespace="default")
        with pytest.raises(NotFound):  # another namespace's id is not found, by id or name
            repo.get_checkpoint(session, other_id, namespace="default")
        with pytest.raises(NotFound):  # no namespace (the worker's lookups): ids only
            repo.get_checkpoint(session, "sentiment")
        assert repo.get_checkpoint(session, ckpt_id).name == "sentiment"


def test_a_base_is_found_by_id_or_by_name_in_its_namespace(database: Database) -> None:
    base_id = _ready_base(database, "minilm")
    _ready_base(database, "llama", namespace="team-b")
    with database.sessions() as session:
        assert repo.get_base(session, "minilm", namespace="default").id == base_id
        assert repo.get_base(session, base_id, namespace="default").name == "minilm"
        with pytest.raises(NotFound):
            repo.get_base(session, "llama", namespace="default")
    with database.sessions.begin() as session:  # creating a checkpoint takes the name too
        ckpt = repo.create_checkpoint(session, name="ft", base_id="minilm", method="nps")
        assert ckpt.base_id == base_id


def test_an_id_wins_over_a_name_that_looks_like_it(database: Database) -> None:
    base_id = _ready_base(database, "minilm")
    first = _checkpoint(database, "first", base_id)
    impostor = _checkpoint(database, first, base_id)  # named after the other's id
    with database.sessions() as session:
        assert repo.get_checkpoint(session, first, namespace="default").name == "first"
        assert repo.get_checkpoint(session, impostor, namespace="default").name == first
