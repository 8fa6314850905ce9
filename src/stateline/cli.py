"""The ``stateline`` command line."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import typer
from rich.console import Console

import stateline
from stateline.database import DEFAULT_URL
from stateline.errors import NotFound, StatelineError
from stateline.types import Put

if TYPE_CHECKING:
    from stateline.cases import Verification
    from stateline.streams import CheckReport

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Durable, multi-tenant state.")
console = Console()

URL_OPTION = typer.Option(DEFAULT_URL, "--url", envvar="STATELINE_URL", help="Store URL.")


def _print_version(value: bool) -> None:
    if value:
        print(f"stateline {stateline.__version__}")
        raise typer.Exit


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Durable, multi-tenant state."""


TENANT_OPTION = typer.Option("default", "--tenant", "-t", help="Tenant name.")


@app.command()
def demo(url: str = URL_OPTION) -> None:
    """Commit a document on the store and read it back."""
    with stateline.open(url) as db:
        t = db.tenant("demo")
        item = t.get("docs", "hello")
        version = 0 if item is None else item.version
        commit = t.commit(ops=[Put("docs", "hello", {"greeting": "hello, stateline", "visits": version + 1})])
        back = t.get("docs", "hello")
        assert back is not None
        console.print(f"store: [bold]{url}[/bold]")
        console.print(f"committed revision {commit.revision}; read back version {back.version}: {back.value}")


@app.command()
def put(key: str, value: str, namespace: str = "docs", url: str = URL_OPTION, tenant: str = TENANT_OPTION) -> None:
    """Write a JSON value."""
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"VALUE is not JSON: {exc}") from None
    with stateline.open(url) as db:
        commit = db.tenant(tenant).commit(ops=[Put(namespace, key, parsed)])
    console.print(f"revision {commit.revision}, version {commit.versions[(namespace, key)]}")


@app.command()
def get(key: str, namespace: str = "docs", url: str = URL_OPTION, tenant: str = TENANT_OPTION) -> None:
    """Read a value."""
    with stateline.open(url) as db:
        item = db.tenant(tenant).get(namespace, key)
    if item is None:
        console.print("not found")
        raise typer.Exit(1)
    console.print_json(orjson.dumps({"value": item.value, "version": item.version}).decode())


keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (stored hashed; a key's secret is shown once).")
app.add_typer(keys_app, name="keys")
relays_app = typer.Typer(no_args_is_help=True, help="The relays to NATS that change-feed retention waits for.")
app.add_typer(relays_app, name="relays")


@app.command()
def serve(
    url: str = URL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8080, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Worker processes."),
    rate_limit: float = typer.Option(
        1000.0, "--rate-limit", envvar="STATELINE_RATE_LIMIT", help="Requests/s per tenant per worker (0: off)."
    ),
    sweep_interval: float = typer.Option(
        60.0,
        "--sweep-interval",
        min=0,
        envvar="STATELINE_SWEEP_INTERVAL",
        help="Seconds between removals of expired items from the store (0: off).",
    ),
    keep_changes: int = typer.Option(
        0,
        "--keep-changes",
        min=0,
        envvar="STATELINE_KEEP_CHANGES",
        help="At each sweep, trim every tenant's change feed to its last N records, keeping what relays "
        "have not published (0: keep all).",
    ),
    audit_retention_days: float = typer.Option(
        0.0,
        "--audit-retention-days",
        min=0,
        envvar="STATELINE_AUDIT_RETENTION_DAYS",
        help="At each sweep, remove audit entries older than this many days (0: keep all).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    bootstrap_tenant: str = typer.Option(
        "default", "--bootstrap-tenant", help="Tenant of the admin key created when the store has no key."
    ),
    relay: bool = typer.Option(False, "--relay", help="Also relay every change to NATS JetStream."),
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats", envvar="STATELINE_NATS", help="NATS for --relay."),
) -> None:
    """Run the HTTP service and its dashboard (FastAPI on uvicorn)."""
    import os  # noqa: PLC0415  # the server's imports stay off the other commands' start-up path
    import shutil  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    from stateline.api import ApiSettings, create_app  # noqa: PLC0415
    from stateline.api.server import bootstrap_admin_key  # noqa: PLC0415
    from stateline.observability import MULTIPROC_DIR, configure_logging, multiprocess_dir  # noqa: PLC0415

    if workers > 1 and url.startswith("memory:"):
        raise typer.BadParameter("memory:// lives in one process; use --workers 1 or a shared store")
    db = stateline.open(url)
    token = bootstrap_admin_key(db, bootstrap_tenant)
    where = f"http://{host}:{port}"
    banner = [
        f"stateline {stateline.__version__} serving {url} on {where}",
        f"  dashboard: {where}/ui/",
        f"  API docs:  {where}/docs  (OpenAPI: {where}/openapi.json)",
        f"  metrics:   {where}/metrics",
    ]
    if token is not None:
        banner.append(f"  admin key for tenant {bootstrap_tenant!r} (shown once, keep it): {token}")
    else:
        banner.append(
            f"  API keys exist; make one with: stateline keys create --url {url} --tenant NAME --scopes read,write"
        )
    if relay:
        banner.append(f"  relay:     every change to {nats_url} (stream STATELINE, subjects stateline.>)")
    print("\n".join(banner), flush=True)  # plain: never wrapped, shown even when stdout is a pipe
    bus = None
    if relay:
        from stateline.bus import Relay  # noqa: PLC0415

        bus_db = db if workers == 1 else stateline.open(url)
        bus = Relay(bus_db.store, nats_url)
        bus.start()
    configure_logging(log_level.upper())
    common = {"host": host, "port": port, "log_config": None, "timeout_graceful_shutdown": 10, "access_log": False}
    if workers == 1:
        settings = ApiSettings(
            rate_limit=rate_limit or None,
            sweep_interval=sweep_interval or None,
            keep_changes=keep_changes or None,
            audit_retention_days=audit_retention_days or None,
        )
        app_obj = create_app(db, settings=settings)
        try:
            uvicorn.run(app_obj, **common)  # type: ignore[arg-type]
        finally:
            if bus is not None:
                bus.stop()
            db.close()
        return
    db.close()
    os.environ["STATELINE_URL"] = url
    os.environ["STATELINE_RATE_LIMIT"] = str(rate_limit)
    os.environ["STATELINE_SWEEP_INTERVAL"] = str(sweep_interval)
    os.environ["STATELINE_KEEP_CHANGES"] = str(keep_changes)
    os.environ["STATELINE_AUDIT_RETENTION_DAYS"] = str(audit_retention_days)
    os.environ["STATELINE_LOG_LEVEL"] = log_level
    own_metrics_dir = None
    if not os.environ.get(MULTIPROC_DIR):
        # every worker writes its metrics there and /metrics on any of them sums them all (one
        # worker's counters alone would look to Prometheus like a reset at each scrape of another)
        own_metrics_dir = multiprocess_dir()
        os.environ[MULTIPROC_DIR] = own_metrics_dir
    try:
        uvicorn.run("stateline.api.server:app_from_env", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    finally:
        if bus is not None:
            bus.stop()
            bus.store.close()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", "-t", help="The tenant the key works in."),
    scopes: str = typer.Option("read,write", "--scopes", help="Comma-separated: read, write, admin, docs:write, ..."),
    name: str = typer.Option("", "--name", help="A label for people."),
    expires_in: float | None = typer.Option(None, "--expires-in", help="Seconds until the key expires."),
    url: str = URL_OPTION,
) -> None:
    """Create an API key and print it (the only time it is shown)."""
    from stateline.api.auth import KeyStore  # noqa: PLC0415

    with stateline.open(url) as db:
        token, key = KeyStore(db.store).create(
            tenant, [s.strip() for s in scopes.split(",") if s.strip()], name=name, expires_in=expires_in
        )
    console.print(f"key id {key.id} for tenant {key.tenant!r}, scopes {', '.join(key.scopes)}")
    print(token)


@keys_app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Only this tenant's keys."),
    url: str = URL_OPTION,
) -> None:
    """List keys (never their secrets)."""
    from stateline.api.auth import KeyStore  # noqa: PLC0415

    with stateline.open(url) as db:
        keys = KeyStore(db.store).list(tenant)
    for k in keys:
        state = "revoked" if k.revoked else "active"
        console.print(orjson.dumps({**k.to_dict(), "state": state}).decode(), highlight=False, soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(key_id: str, url: str = URL_OPTION) -> None:
    """Revoke a key by its id (the part after ``sl_``)."""
    from stateline.api.auth import KeyStore  # noqa: PLC0415

    with stateline.open(url) as db:
        key = KeyStore(db.store).revoke(key_id)
    console.print(f"revoked {key.id} (tenant {key.tenant!r})")


@app.command()
def relay(
    url: str = URL_OPTION,
    nats_url: str = typer.Option("nats://127.0.0.1:4222", "--nats", envvar="STATELINE_NATS", help="NATS server."),
    stream: str = typer.Option("STATELINE", "--stream", help="JetStream stream (created if missing)."),
    prefix: str = typer.Option("stateline", "--prefix", help="Subject prefix: <prefix>.<tenant>.<layer>.<event>."),
    retention: str = typer.Option("limits", "--retention", help="limits, interest or workqueue."),
    max_age: float = typer.Option(0.0, "--max-age", min=0, help="Seconds JetStream keeps a message (0: forever)."),
    aliases: bool = typer.Option(
        True, "--aliases/--no-aliases", help="Also publish run events to caf.exec.* and beamline.usage.*."
    ),
    alias_prefix: str = typer.Option(
        "", "--alias-prefix", help="Put before those subjects, so two relays on one NATS do not claim the same ones."
    ),
) -> None:
    """Publish every committed change to NATS JetStream, exactly once, in order per tenant."""
    import signal  # noqa: PLC0415 - only this command needs them
    import threading  # noqa: PLC0415

    from stateline.bus import Relay  # noqa: PLC0415

    db = stateline.open(url)
    bus = Relay(
        db.store,
        nats_url,
        stream=stream,
        prefix=prefix,
        aliases=aliases,
        alias_prefix=alias_prefix,
        retention=retention,
        max_age=max_age or None,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    bus.start()
    print(f"relaying {url} to {nats_url} (stream {stream}, subjects {prefix}.<tenant>.<layer>.<event>)", flush=True)
    try:
        while not done.wait(5):
            behind = sum(bus.lag().values())
            if behind:
                console.print(f"lag: {behind} revisions behind")
    finally:
        bus.stop()
        db.close()


@relays_app.command("list")
def relays_list(url: str = URL_OPTION) -> None:
    """Each relay of the store, with how many revisions of each tenant it has yet to publish."""
    from stateline.sweeper import relay_positions  # noqa: PLC0415
    from stateline.types import SYSTEM_TENANT  # noqa: PLC0415

    with stateline.open(url) as db:
        positions = relay_positions(db.store)
        heads = db.store.all_revisions() if positions else {}
        heads.pop(SYSTEM_TENANT, None)  # relays skip it
    if not positions:
        console.print("no relays")
    for stream, published in sorted(positions.items()):
        behind = {t: head - published.get(t, 0) for t, head in heads.items() if head > published.get(t, 0)}
        line = {"stream": stream, "tenants_published": len(published), "behind": behind}
        console.print(orjson.dumps(line).decode(), highlight=False, soft_wrap=True)


@relays_app.command("forget")
def relays_forget(stream: str, url: str = URL_OPTION) -> None:
    """Let go of a retired relay (by its JetStream stream), so that retention no longer keeps
    records for it. Only for a relay that will not run again."""
    from stateline.sweeper import forget_relay  # noqa: PLC0415

    with stateline.open(url) as db:
        n = forget_relay(db.store, stream)
    console.print(f"forgot relay {stream!r} ({n} cursor(s)): change-feed retention no longer waits for it")


@app.command()
def sweep(
    url: str = URL_OPTION,
    keep_changes: int = typer.Option(
        0, "--keep-changes", min=0, help="Trim each tenant's change feed to its last N records (0: keep all)."
    ),
    audit_retention_days: float = typer.Option(
        0.0, "--audit-retention-days", min=0, help="Remove audit entries older than this many days (0: keep all)."
    ),
) -> None:
    """Remove expired items (and, if asked, old change records and audit entries) once, then exit.

    What ``stateline serve`` does every minute, for deployments that run no server: from cron, say."""
    from stateline.sweeper import Sweeper  # noqa: PLC0415

    with stateline.open(url) as db:
        done = Sweeper(
            db.store,
            max_per_run=10**12,
            keep_changes=keep_changes or None,
            audit_retention_days=audit_retention_days or None,
        ).run_once()
    print(f"removed {done.items} expired item(s), {done.changes} change record(s), {done.audit} audit entries")


def _line(obj: object) -> None:
    """One JSON document per line on stdout (plain: never wrapped, easy to pipe into ``jq``)."""
    print(orjson.dumps(obj).decode(), flush=True)


def _time_us(value: str | None, option: str) -> int | None:
    """An ISO 8601 time (UTC when it names no zone) or µs since the epoch, as µs since the epoch."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO 8601 time (2026-12-07T10:00:00Z) nor µs since the epoch", param_hint=option
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1_000_000)


@app.command()
def inspect(
    url: str = URL_OPTION,
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="This tenant's counts (default: list tenants)."),
    streams: bool = typer.Option(False, "--streams", help="List the tenant's streams with their bounds instead."),
    prefix: str = typer.Option("", "--prefix", help="With --streams: only streams whose name starts with this."),
    limit: int = typer.Option(1000, "--limit", min=1, help="With --streams: at most this many."),
) -> None:
    """What a store holds: its tenants, one tenant's items, streams and change feed, or its streams.

    Prints JSON lines. Without ``--tenant``: each tenant and its revision. With it: the tenant's
    revision, live items and bytes per namespace, streams, kept events and the oldest change record
    still kept. With ``--streams``: each stream of the tenant with its first kept and last seq."""
    from stateline.types import SYSTEM_TENANT  # noqa: PLC0415

    with stateline.open(url) as db:
        if tenant is None:
            if streams:
                raise typer.BadParameter("--streams needs --tenant", param_hint="--streams")
            for name, revision in sorted(db.store.all_revisions().items()):
                if name != SYSTEM_TENANT:
                    _line({"tenant": name, "revision": revision})
            return
        t = db.tenant(tenant)
        if streams:
            after: str | None = None
            left = limit
            while left > 0:
                want = min(1000, left)
                page = t.store.list_streams(tenant, prefix=prefix, after=after, limit=want)
                for info in page:
                    _line({"stream": info.stream, "first_seq": info.first_seq, "last_seq": info.last_seq})
                if len(page) < want:
                    break
                left -= want
                after = page[-1].stream
            return
        stats = t.stats()
        _line(
            {
                "tenant": tenant,
                "revision": stats.revision,
                "namespaces": {ns: {"items": n.items, "bytes": n.bytes} for ns, n in sorted(stats.namespaces.items())},
                "streams": stats.streams,
                "events": stats.events,
                "first_change": t.first_change() if stats.revision else None,
            }
        )


@app.command()
def replay(
    stream: str = typer.Argument(..., help="The stream, e.g. cases:<id>:events or runs:<run id>."),
    url: str = URL_OPTION,
    tenant: str = TENANT_OPTION,
    from_seq: int = typer.Option(1, "--from", min=1, help="First seq."),
    to_seq: int | None = typer.Option(None, "--to", min=1, help="Last seq (default: the end)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many events."),
) -> None:
    """Print a stream's events in order, one JSON line each (stream, seq, type, data, meta, revision, recorded_at)."""
    with stateline.open(url) as db:
        t = db.tenant(tenant)
        info = t.stream_info(stream)
        if info.last_seq == 0:
            console.print(f"stream {stream!r} of tenant {tenant!r} has no events", style="yellow")
            raise typer.Exit(1)
        seq, last = max(from_seq, info.first_seq), info.last_seq if to_seq is None else min(to_seq, info.last_seq)
        left = limit
        while seq <= last and (left is None or left > 0):
            page = t.read_stream(stream, seq, last, 1000 if left is None else min(1000, left))
            if not page:
                break
            for e in page:
                _line(e.to_dict())
            seq = page[-1].seq + 1
            if left is not None:
                left -= len(page)


@app.command()
def changes(
    url: str = URL_OPTION,
    tenant: str = TENANT_OPTION,
    after: int = typer.Option(0, "--after", min=0, help="Start after this revision."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many records."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new commits as they come (Ctrl-C ends)."),
) -> None:
    """Print a tenant's change feed from ``--after``, one JSON line per commit (revision, time, meta, ops)."""
    left = limit
    with stateline.open(url) as db:
        t = db.tenant(tenant)
        try:
            while left is None or left > 0:
                n = 1000 if left is None else min(1000, left)
                page = t.watch(after, timeout=5.0, limit=n) if follow else t.changes(after, limit=n)
                for c in page:
                    _line(c.to_dict())
                if page:
                    after = page[-1].revision
                    if left is not None:
                        left -= len(page)
                elif not follow:
                    break
        except KeyboardInterrupt:
            pass


CASE_OPTION = typer.Option(None, "--case", help="Check this case's receipts (repeatable).")
STREAM_OPTION = typer.Option(None, "--stream", help="Check this stream of the streams layer (repeatable).")


@app.command()
def verify(
    url: str = URL_OPTION,
    tenant: str = TENANT_OPTION,
    case: list[str] | None = CASE_OPTION,
    stream: list[str] | None = STREAM_OPTION,
    audit: bool = typer.Option(False, "--audit", help="Check the audit log."),
) -> None:
    """Check a tenant's history: by default its audit chain and every case's receipt chain.

    ``--audit``, ``--case ID`` and ``--stream NAME`` check only what they name (a stream: seqs
    contiguous, revisions and times in order). Prints one JSON line per history checked; exits with
    0 when all are intact, 1 when one is not (its line says where and why), 2 when a case or stream
    asked for does not exist."""
    everything = not (case or stream or audit)
    broken = missing = 0
    with stateline.open(url) as db:
        t = db.tenant(tenant)
        if everything or audit:
            a = t.audit.verify()
            broken += not a.ok
            _line(
                {
                    "chain": "audit",
                    "ok": a.ok,
                    "checked": a.checked,
                    "first_bad_seq": a.first_bad_seq,
                    "reason": a.reason,
                }
            )
        named: list[tuple[Callable[[str], Any], Callable[[Any], dict[str, Any]], str]] = [
            (t.cases.verify, _case_line, cid) for cid in (_all_case_ids(t) if everything else case or ())
        ]
        named += [(t.streams.check, _stream_line, name) for name in stream or ()]
        for check, line, name in named:
            try:
                result = check(name)
            except NotFound as exc:
                console.print(f"[red]error[/red] {exc.code}: {exc.message}")
                missing += 1
                continue
            broken += not result.ok
            _line(line(result))
    if missing or broken:
        raise typer.Exit(2 if missing else 1)


def _case_line(v: Verification) -> dict[str, Any]:
    return {
        "chain": "case",
        "case_id": v.case_id,
        "ok": v.ok,
        "checked": v.checked,
        "first_bad_seq": v.first_bad_seq,
        "reason": v.reason,
        "detail": v.detail or None,
    }


def _stream_line(r: CheckReport) -> dict[str, Any]:
    return {
        "chain": "stream",
        "stream": r.stream,
        "ok": r.ok,
        "checked": r.events,
        "first_seq": r.first_seq,
        "last_seq": r.last_seq,
        "issues": [{"kind": x.kind, "seq": x.seq, "detail": x.detail} for x in r.issues],
    }


def _all_case_ids(t: stateline.Tenant) -> list[str]:
    ids: list[str] = []
    after: str | None = None
    while True:
        page = t.cases.list_ids(after=after, limit=1000)
        ids += page
        if len(page) < 1000:
            return ids
        after = page[-1]


@app.command("audit")
def audit_query(
    url: str = URL_OPTION,
    tenant: str = TENANT_OPTION,
    user: str | None = typer.Option(
        None, "--user", help="Only entries by this user (for writes over HTTP: key:<key id>)."
    ),
    action: str | None = typer.Option(None, "--action", help="Only this action, e.g. docs.put."),
    resource_type: str | None = typer.Option(None, "--resource-type", help="Only this type of resource."),
    resource_id: str | None = typer.Option(None, "--resource-id", help="Only this resource."),
    since: str | None = typer.Option(None, "--since", help="From this time: ISO 8601 (UTC if no zone) or µs."),
    until: str | None = typer.Option(None, "--until", help="Up to this time (inclusive), same forms."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many entries."),
    oldest: bool = typer.Option(False, "--oldest", help="Oldest first (default: newest first)."),
) -> None:
    """Query the tenant's audit log: one JSON line per entry matching every filter given."""
    from_ts, to_ts = _time_us(since, "--since"), _time_us(until, "--until")
    with stateline.open(url) as db:
        log = db.tenant(tenant).audit
        left, after = limit, None
        while left > 0:
            page = log.query(
                user=user,
                action=action,
                resource_type=resource_type,
                resource_id=resource_id,
                from_ts=from_ts,
                to_ts=to_ts,
                after=after,
                limit=min(left, 1000),
                order="oldest" if oldest else "newest",
            )
            for e in page.entries:
                _line(e)
            left -= len(page.entries)
            if page.next_after is None:
                break
            after = page.next_after


@app.command()
def backup(
    dest: str = typer.Argument(..., help="The new file to write (never overwritten)."),
    url: str = URL_OPTION,
) -> None:
    """Copy a SQLite store to a new file, consistent as of one moment, while it is in use.

    The copy is compacted and complete once it has its name (until then it is ``DEST.partial-*``).
    For PostgreSQL, back up the store's schema with ``pg_dump --schema``; Redis keeps what its
    RDB/AOF settings give."""
    from stateline.store.sqlite import SQLiteStore  # noqa: PLC0415

    with stateline.open(url) as db:
        store = db.store
        if not isinstance(store, SQLiteStore):
            why = {
                "memory": "memory:// lives in one process and has no file to copy",
                "postgresql": "for PostgreSQL, use pg_dump --schema with the store's schema",
            }.get(store.scheme, f"{store.scheme}:// keeps what its server's persistence settings give")
            raise typer.BadParameter(f"backup copies SQLite stores; {why}", param_hint="--url")
        size = store.backup(dest)
    print(f"backed up {url} to {dest} ({size:,} bytes)")


ONLY_OPTION = typer.Option(None, "--only", help="Run only these benchmarks (repeatable).")
BACKEND_OPTION = typer.Option(None, "--backend", help="Only these backends (repeatable).")


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="A short pass."),
    only: list[str] | None = ONLY_OPTION,
    backend: list[str] | None = BACKEND_OPTION,
) -> None:
    """Run the benchmarks beside their peers (from a source checkout: ``bench/run.py``)."""
    import subprocess  # noqa: PLC0415 - only this command needs them
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    runner = next(
        (p / "bench" / "run.py" for p in (Path.cwd(), *Path.cwd().parents) if (p / "bench" / "run.py").exists()), None
    )
    if runner is None:
        raise typer.BadParameter("run it from a stateline source checkout (bench/ is not installed with the package)")
    args = [sys.executable, str(runner)] + (["--quick"] if quick else [])
    args += [a for name in only or () for a in ("--only", name)]
    args += [a for name in backend or () for a in ("--backend", name)]
    raise typer.Exit(subprocess.call(args, cwd=runner.parent.parent))  # noqa: S603 - our own script, fixed arguments


def main() -> None:
    """Entry point of the ``stateline`` script."""
    try:
        app()
    except StatelineError as exc:
        console.print(f"[red]error[/red] {exc.code}: {exc.message}")
        raise SystemExit(2) from None
