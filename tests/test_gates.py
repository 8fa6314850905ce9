"""Feature gates on every backend: each checkpoint, a missing one, a garbage one, an unreadable store; never raising."""

from __future__ import annotations

import logging

import pytest

from stateline import Database, FakeClock, InvalidArgument, Put, Store
from stateline.gates import BASELINE, CHECKPOINTS, ENV_VAR, FEATURES, MAX_WARNINGS, Gates
from tests.conftest import Backend

EXPECTED = {
    None: BASELINE,
    "CP1-LC": BASELINE | {f for f, cp in FEATURES.items() if cp == "CP1-LC"},
    "CP2-LC": BASELINE | {f for f, cp in FEATURES.items() if cp in ("CP1-LC", "CP2-LC")},
    "CP3-LC": frozenset(FEATURES),
}


def _set_checkpoint(store: Store, value: object) -> None:
    """What an operator does outside stateline: write the checkpoint with a raw Store commit."""
    store.commit("system", ops=[Put("gates", "checkpoint", value)])


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_baseline_is_what_the_issue_names() -> None:
    assert {"basic_routing", "local_audit", "basic_metrics", "single_tenant"} == BASELINE
    assert EXPECTED["CP1-LC"] < EXPECTED["CP2-LC"] < EXPECTED["CP3-LC"]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_every_checkpoint_from_each_source(store: Store, checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = EXPECTED[checkpoint]
    by_arg = Gates(store, checkpoint=checkpoint)
    by_env = Gates(store, environ={ENV_VAR: checkpoint})
    _set_checkpoint(store, checkpoint)
    by_store = Gates(store)
    for g, source in [(by_arg, "argument"), (by_env, "environment"), (by_store, "store")]:
        s = g.status()
        assert (s.checkpoint, s.source, s.reason) == (checkpoint, source, None)
        assert g.checkpoint == checkpoint
        assert g.features() == expected
        for feature in FEATURES:
            assert g.available(feature) == (feature in expected)
    monkeypatch.setenv(ENV_VAR, checkpoint.lower())  # the real environment, case-insensitively
    assert Gates(None).checkpoint == checkpoint


def test_store_value_may_be_an_object(store: Store) -> None:
    _set_checkpoint(store, {"checkpoint": "CP2-LC", "set_by": "ops"})
    assert Gates(store).features() == EXPECTED["CP2-LC"]


def test_precedence_argument_then_environment_then_store(store: Store) -> None:
    _set_checkpoint(store, "CP3-LC")
    assert Gates(store, checkpoint="CP1-LC", environ={ENV_VAR: "CP2-LC"}).checkpoint == "CP1-LC"
    assert Gates(store, environ={ENV_VAR: "CP2-LC"}).checkpoint == "CP2-LC"
    assert Gates(store, environ={}).checkpoint == "CP3-LC"


def test_missing_checkpoint_gives_the_baseline_and_logs_once(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    g = Gates(store, refresh=0)
    with caplog.at_level(logging.WARNING, logger="stateline.gates"):
        for _ in range(5):
            assert g.features() == BASELINE
            assert g.checkpoint is None
            assert g.available("basic_routing")
            assert not g.available("multi_tenant")
    records = [r for r in caplog.records if r.name == "stateline.gates"]
    assert len(records) == 1
    assert "no checkpoint configured" in records[0].getMessage()
    assert g.status().reason is not None


@pytest.mark.parametrize("garbage", ["CP9-LC", "", "  ", "cp2", 42, ["CP1-LC"], {"checkpoint": 3}, None])
def test_garbage_in_the_store_gives_the_baseline(
    store: Store, garbage: object, caplog: pytest.LogCaptureFixture
) -> None:
    _set_checkpoint(store, garbage)
    g = Gates(store, refresh=0)
    with caplog.at_level(logging.WARNING, logger="stateline.gates"):
        assert g.features() == BASELINE
        assert g.features() == BASELINE
    assert len([r for r in caplog.records if r.name == "stateline.gates"]) == 1
    assert g.status().source == "store"


@pytest.mark.parametrize("garbage", ["CP4-LC", "latest", "CP1-LC;drop"])
def test_garbage_in_configuration_gives_the_baseline(store: Store, garbage: str) -> None:
    _set_checkpoint(store, "CP3-LC")  # a bad configured value is not silently replaced by the store's
    assert Gates(store, checkpoint=garbage).features() == BASELINE
    g = Gates(store, environ={ENV_VAR: garbage})
    assert g.features() == BASELINE
    assert "unknown checkpoint" in (g.status().reason or "")


def test_unreadable_store_gives_the_baseline_and_never_raises(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    broken = backend.open()
    _set_checkpoint(broken, "CP3-LC")
    broken.close()  # every read now raises Unavailable
    g = Gates(broken, refresh=0)
    with caplog.at_level(logging.WARNING, logger="stateline.gates"):
        assert g.features() == BASELINE
        assert not g.available("nats_relay")
        assert g.checkpoint is None
    assert "could not be read" in (g.status().reason or "")
    assert len([r for r in caplog.records if r.name == "stateline.gates"]) == 1


def test_store_changes_are_seen_after_the_refresh_interval(store: Store, clock: FakeClock) -> None:
    _set_checkpoint(store, "CP1-LC")
    g = Gates(store, refresh=30)
    assert g.checkpoint == "CP1-LC"
    _set_checkpoint(store, "CP3-LC")
    assert g.checkpoint == "CP1-LC"
    clock.advance(30)
    assert g.checkpoint == "CP3-LC"


def test_unknown_feature_is_unavailable(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    g = Gates(store, checkpoint="CP3-LC")
    with caplog.at_level(logging.WARNING, logger="stateline.gates"):
        assert not g.available("teleport")
        assert not g.available("teleport")
        assert not g.available(None)  # type: ignore[arg-type]
    assert len([r for r in caplog.records if r.name == "stateline.gates"]) == 2


def test_gates_are_read_only(db: Database, store: Store) -> None:
    _set_checkpoint(store, "CP2-LC")
    before = store.revision("system")
    for g in (db.gates, db.tenant("acme").gates, Gates(store, refresh=0)):
        g.features()
        g.available("multi_tenant")
        g.status()
    assert db.gates is db.tenant("acme").gates
    assert db.gates.checkpoint == "CP2-LC"
    assert store.revision("system") == before
    assert store.revision("acme") == 0


def test_a_bad_table_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="table"):
        Gates(None, table={"x": "CP7-LC"})
    with pytest.raises(InvalidArgument, match="refresh"):
        Gates(None, refresh=-1)
    for bad in ({"table": [("x", None)]}, {"environ": "STATELINE_CHECKPOINT=CP1-LC"}, {"checkpoint": 1}):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            Gates(None, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="store"):
        Gates("sqlite:///x.db")  # type: ignore[arg-type]
    custom = Gates(None, checkpoint="CP1-LC", table={"a": None, "b": "CP1-LC", "c": "CP2-LC"})
    assert custom.features() == {"a", "b"}


def test_warnings_about_unknown_features_are_bounded(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    g = Gates(store, checkpoint="CP3-LC")
    with caplog.at_level(logging.WARNING, logger="stateline.gates"):
        for i in range(MAX_WARNINGS + 50):
            assert not g.available(f"made-up-{i}")
    records = [r.getMessage() for r in caplog.records if r.name == "stateline.gates"]
    assert len(records) == MAX_WARNINGS + 1
    assert "further ones are not" in records[-1]
    assert len(g._logged) == MAX_WARNINGS
