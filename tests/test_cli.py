"""The operator's commands: inspect, replay, changes, verify and audit, run on a SQLite file."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

import stateline
from stateline import Put
from stateline.cli import app, main
from stateline.runs import StepSpec

runner = CliRunner()


def lines(output: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    with stateline.open(url) as db:
        t = db.tenant("acme")
        t.docs.put("greeting", {"hello": "world"})
        case = t.cases.create("order-1", {"n": 1})
        case.put_ctx("n", 2).commit()
        case.increment_step_count().commit()
        t.cases.create("order-2", {"n": 1})
        t.runs.create("flow", [StepSpec("a")])
        t.audit.log(user="alice", action="docs.put", resource_type="doc", resource_id="greeting")
        t.audit.log(user="bob", action="cases.commit", resource_type="case", resource_id="order-1")
        t.audit.log(user="alice", action="cases.commit", resource_type="case", resource_id="order-2")
        t.streams.append("orders", [{"type": "placed", "data": {"n": i}} for i in range(3)])
        db.tenant("beta").docs.put("x", 1)
    return url


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def db_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def test_inspect_lists_tenants_counts_and_streams(url: str) -> None:
    code, out = run("inspect", "--url", url)
    assert code == 0, out
    with stateline.open(url) as db:
        revisions = {"acme": db.tenant("acme").revision(), "beta": db.tenant("beta").revision()}
        stats = db.tenant("acme").stats()
        streams = [s.stream for s in db.store.list_streams("acme")]
    assert lines(out) == [{"tenant": t, "revision": r} for t, r in revisions.items()]

    code, out = run("inspect", "--url", url, "--tenant", "acme")
    assert code == 0, out
    [got] = lines(out)
    assert got["revision"] == revisions["acme"]
    assert got["namespaces"] == {ns: {"items": n.items, "bytes": n.bytes} for ns, n in stats.namespaces.items()}
    assert (got["streams"], got["events"], got["first_change"]) == (stats.streams, stats.events, 1)

    code, out = run("inspect", "--url", url, "--tenant", "acme", "--streams")
    assert code == 0, out
    assert [s["stream"] for s in lines(out)] == streams
    code, out = run("inspect", "--url", url, "-t", "acme", "--streams", "--prefix", "cases:order-1:")
    assert lines(out) == [
        {"stream": "cases:order-1:events", "first_seq": 1, "last_seq": 3},
        {"stream": "cases:order-1:receipts", "first_seq": 1, "last_seq": 3},
    ]
    code, out = run("inspect", "--url", url, "-t", "acme", "--streams", "--limit", "2")
    assert [s["stream"] for s in lines(out)] == streams[:2]

    code, out = run("inspect", "--url", url, "--streams")
    assert code == 2
    assert "--streams needs --tenant" in out


def test_replay_prints_a_streams_events_in_order(url: str) -> None:
    with stateline.open(url) as db:
        events = [e.to_dict() for e in db.tenant("acme").read_stream("cases:order-1:events")]
    assert len(events) == 3
    code, out = run("replay", "cases:order-1:events", "--url", url, "-t", "acme")
    assert code == 0, out
    assert lines(out) == events
    _, out = run("replay", "cases:order-1:events", "--url", url, "-t", "acme", "--from", "2")
    assert lines(out) == events[1:]
    _, out = run("replay", "cases:order-1:events", "--url", url, "-t", "acme", "--from", "1", "--to", "2")
    assert lines(out) == events[:2]
    _, out = run("replay", "cases:order-1:events", "--url", url, "-t", "acme", "--limit", "1")
    assert lines(out) == events[:1]

    code, out = run("replay", "cases:nope:events", "--url", url, "-t", "acme")
    assert code == 1
    assert "has no events" in out
    code, _ = run("replay", "cases:order-1:events", "--url", url, "-t", "acme", "--from", "0")
    assert code == 2  # a usage error, nothing read


def test_changes_prints_the_feed_and_follows_it(url: str) -> None:
    with stateline.open(url) as db:
        feed = [c.to_dict() for c in db.tenant("acme").changes()]
        head = db.tenant("acme").revision()
    code, out = run("changes", "--url", url, "-t", "acme")
    assert code == 0, out
    assert lines(out) == feed
    _, out = run("changes", "--url", url, "-t", "acme", "--after", "2", "--limit", "2")
    assert [c["revision"] for c in lines(out)] == [3, 4]
    _, out = run("changes", "--url", url, "-t", "acme", "--after", str(head))
    assert lines(out) == []

    # --follow waits for commits made after it started (here: until it has printed 2 of them)
    followed: list[tuple[int, str]] = []
    follower = threading.Thread(
        target=lambda: followed.append(
            run("changes", "--url", url, "-t", "acme", "--after", str(head), "--follow", "--limit", "2")
        )
    )
    follower.start()
    with stateline.open(url) as db:
        db.tenant("acme").commit(ops=[Put("kv", "later", 1)])
        db.tenant("acme").commit(ops=[Put("kv", "later", 2)])
    follower.join(timeout=30)
    assert not follower.is_alive()
    [(code, out)] = followed
    assert code == 0, out
    got = lines(out)
    assert [c["revision"] for c in got] == [head + 1, head + 2]
    assert [c["ops"] for c in got] == [
        [{"op": "put", "namespace": "kv", "key": "later", "version": v, "value": v, "expires_at": None}] for v in (1, 2)
    ]


def test_verify_passes_intact_chains_and_names_the_tampered_one(url: str) -> None:
    code, out = run("verify", "--url", url, "-t", "acme")
    assert code == 0, out
    assert [(x["chain"], x.get("case_id"), x["ok"]) for x in lines(out)] == [
        ("audit", None, True),
        ("case", "order-1", True),
        ("case", "order-2", True),
    ]

    # edit receipt 2 of order-1 behind the store's back
    with sqlite3.connect(db_path(url)) as con:
        sql = "SELECT data FROM sl_events WHERE tenant = 'acme' AND stream = 'cases:order-1:receipts' AND seq = 2"
        data = orjson.loads(con.execute(sql).fetchone()[0])
        data["timestamp"] += 1
        con.execute(
            "UPDATE sl_events SET data = ? WHERE tenant = 'acme' AND stream = 'cases:order-1:receipts' AND seq = 2",
            (orjson.dumps(data),),
        )
    code, out = run("verify", "--url", url, "-t", "acme")
    assert code == 1, out
    by_case = {x.get("case_id"): x for x in lines(out)}
    assert (by_case["order-1"]["ok"], by_case["order-1"]["first_bad_seq"]) == (False, 2)
    assert by_case["order-2"]["ok"] is True
    assert by_case[None]["ok"] is True  # the audit chain is untouched
    code, out = run("verify", "--url", url, "-t", "acme", "--case", "order-2")
    assert code == 0, out
    assert [x.get("case_id") for x in lines(out)] == ["order-2"]

    # delete the middle audit entry
    with sqlite3.connect(db_path(url)) as con:
        con.execute("DELETE FROM sl_events WHERE tenant = 'acme' AND stream = 'audit:log' AND seq = 2")
    code, out = run("verify", "--url", url, "-t", "acme", "--audit")
    assert code == 1, out
    [audit] = lines(out)
    assert (audit["chain"], audit["ok"], audit["first_bad_seq"]) == ("audit", False, 2)

    # a stream of the streams layer: checked only when asked for; a gap is named
    code, out = run("verify", "--url", url, "-t", "acme", "--stream", "orders", "--case", "order-2")
    assert code == 0, out
    assert [(x["chain"], x["ok"]) for x in lines(out)] == [("case", True), ("stream", True)]
    with sqlite3.connect(db_path(url)) as con:
        con.execute("DELETE FROM sl_events WHERE tenant = 'acme' AND stream = 'streams:orders' AND seq = 2")
    code, out = run("verify", "--url", url, "-t", "acme", "--stream", "orders")
    assert code == 1, out
    [checked] = lines(out)
    assert (checked["ok"], checked["issues"][0]["kind"], checked["issues"][0]["seq"]) == (False, "gap", 3)  # type: ignore[index]

    # what does not exist is named, the rest is still checked, and the exit code says so
    code, out = run("verify", "--url", url, "-t", "acme", "--case", "nope", "--case", "order-2", "--stream", "nope")
    assert code == 2
    assert "'nope' does not exist" in out
    assert "no stream 'nope'" in out
    assert [x.get("case_id") for x in lines(out)] == ["order-2"]


def test_audit_query_filters_and_orders(url: str) -> None:
    with stateline.open(url) as db:
        entries = db.tenant("acme").audit.query(order="oldest").entries
    assert [e.user for e in entries] == ["alice", "bob", "alice"]
    code, out = run("audit", "--url", url, "-t", "acme")
    assert code == 0, out
    assert [x["seq"] for x in lines(out)] == [3, 2, 1]  # newest first
    _, out = run("audit", "--url", url, "-t", "acme", "--oldest", "--user", "alice")
    assert [x["seq"] for x in lines(out)] == [1, 3]
    _, out = run("audit", "--url", url, "-t", "acme", "--action", "cases.commit", "--resource-id", "order-1")
    assert lines(out) == [orjson.loads(orjson.dumps(entries[1]))]
    _, out = run("audit", "--url", url, "-t", "acme", "--limit", "1")
    assert [x["seq"] for x in lines(out)] == [3]

    # time bounds: µs since the epoch, or ISO 8601 (UTC when no zone is given)
    second = entries[1].ts
    _, out = run("audit", "--url", url, "-t", "acme", "--oldest", "--since", str(second))
    assert [x["seq"] for x in lines(out)] == [2, 3]
    _, out = run("audit", "--url", url, "-t", "acme", "--oldest", "--until", str(second))
    assert [x["seq"] for x in lines(out)] == [1, 2]
    iso = datetime.fromtimestamp(entries[0].ts / 1e6, UTC).replace(tzinfo=None).isoformat()  # may round down
    _, out = run("audit", "--url", url, "-t", "acme", "--oldest", "--since", iso)
    assert [x["seq"] for x in lines(out)] == [1, 2, 3]
    _, out = run("audit", "--url", url, "-t", "acme", "--since", "2999-01-01T00:00:00+00:00")
    assert lines(out) == []

    code, out = run("audit", "--url", url, "-t", "acme", "--since", "yesterday")
    assert code == 2
    assert "ISO 8601" in out


def test_version() -> None:
    code, out = run("--version")
    assert (code, out.strip()) == (0, f"stateline {stateline.__version__}")


def test_store_errors_end_the_command_with_their_code(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with stateline.open(url) as db:
        db.tenant("acme").trim_changes(3)
    monkeypatch.setattr("sys.argv", ["stateline", "changes", "--url", url, "-t", "acme"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "changes_trimmed" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["stateline", "inspect", "--url", url, "-t", "no such tenant"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "invalid_argument" in capsys.readouterr().out


def test_backup_copies_a_sqlite_store_and_refuses_others(url: str, tmp_path: Path) -> None:
    dest = tmp_path / "copy.db"
    code, out = run("backup", str(dest), "--url", url)
    assert code == 0, out
    assert f"to {dest}" in out
    _, original = run("inspect", "--url", url, "-t", "acme")
    _, copied = run("inspect", "--url", f"sqlite:///{dest}", "-t", "acme")
    assert lines(copied) == lines(original)
    code, out = run("verify", "--url", f"sqlite:///{dest}", "-t", "acme")
    assert code == 0, out

    code, out = run("backup", str(dest), "--url", url)  # never overwrites
    assert code != 0
    code, out = run("backup", str(tmp_path / "other.db"), "--url", "memory://")
    assert code == 2
    assert "no file to copy" in out
    assert not (tmp_path / "other.db").exists()


def test_replay_and_changes_page_through_long_histories(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'long.db'}?synchronous=NORMAL"
    with stateline.open(url) as db:
        t = db.tenant("acme")
        for i in range(0, 2_345, 500):
            t.streams.append("long", [{"type": "n", "data": {"i": j}} for j in range(i, min(2_345, i + 500))])
        for i in range(1_200):
            t.commit(ops=[Put("kv", "k", i)])
        revision = t.revision()
    _, out = run("replay", "streams:long", "--url", url, "-t", "acme")
    assert [e["data"]["i"] for e in lines(out)] == list(range(2_345))  # type: ignore[index]
    _, out = run("replay", "streams:long", "--url", url, "-t", "acme", "--from", "1000", "--limit", "1500")
    assert [e["seq"] for e in lines(out)] == list(range(1_000, 2_346))
    _, out = run(
        "replay", "streams:long", "--url", url, "-t", "acme", "--from", "900", "--to", "2100", "--limit", "1150"
    )
    assert [e["seq"] for e in lines(out)] == list(range(900, 2_050))
    _, out = run("changes", "--url", url, "-t", "acme")
    assert [c["revision"] for c in lines(out)] == list(range(1, revision + 1))
    _, out = run("changes", "--url", url, "-t", "acme", "--after", "5", "--limit", "1100")
    assert [c["revision"] for c in lines(out)] == list(range(6, 1_106))
