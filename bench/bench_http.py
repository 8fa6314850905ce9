"""HTTP throughput of stateline's routes beside a bare Starlette endpoint and a default FastAPI + pydantic one.

Every server is its own uvicorn process with the same settings (``UVICORN``: one worker, 127.0.0.1, log
level warning, no access log, the same event loop and HTTP implementation: by default uvicorn's choice,
as ``stateline serve`` runs, which is httptools and uvloop when installed; ``--http h11`` for the
pure-Python parser on asyncio's loop); the load comes from ``wrk``
(Debian: ``apt-get install wrk``) with one thread and ``--connections`` keep-alive connections. Every
contender gets byte-for-byte the same requests (same paths, the same ``Authorization`` header, which
the peers ignore), so that no one parses less than another. Figures are requests/s answered 2xx; runs
alternate between the contenders and the median of ``--runs`` runs is reported with its ratio.

* ``doc PUT``: ``PUT /v1/docs/<key>`` (stateline: auth, scope check, docs layer commit with metadata,
  an audit entry in the tenant's hash-chained log, metrics, a span) against endpoints that parse the same
  body and return the same JSON (bare: orjson; FastAPI: pydantic model in, ``response_model`` out).
* ``case commit``: ``POST /v1/cases/<id>/commit`` with one mutation over 256 cases, likewise.
* ``raw commit``: ``POST /v1/transaction`` with one counter increment, likewise.

Also the commit-to-SSE-client latency: a client follows ``/v1/watch`` while another makes doc PUTs;
the figure is the time from sending the PUT to the event reaching the SSE client (median).

Run: ``python bench/bench_http.py [--quick] [--backends memory,sqlite,postgresql,redis]`` (default: memory
and SQLite; PostgreSQL at ``--pg`` and Redis at ``--redis``, each in a schema / key prefix of its own that
is dropped afterwards; a backend whose server cannot be reached is skipped with a line saying so).
Stateline runs with its per-tenant rate limit off (it would otherwise cap the figure at its default 1000
requests/s). The peers keep no state, so their figures are the same whatever the backend: on the shared
stores the ratios show the cost of the store's round trips on top of the service's own.
"""

import argparse
import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import record

HERE = Path(__file__).resolve()
CASES = 256
BACKENDS = ("memory", "sqlite", "postgresql", "redis")
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
#: the server settings of every contender
UVICORN: dict[str, Any] = {"host": "127.0.0.1", "log_level": "warning", "access_log": False}
#: ``--http``: uvicorn's HTTP implementation and event loop for every contender
HTTP_MODES: dict[str, dict[str, str]] = {
    "auto": {"http": "auto", "loop": "auto"},
    "h11": {"http": "h11", "loop": "asyncio"},
}


def _server_options() -> dict[str, Any]:
    """``UVICORN`` with the HTTP implementation chosen by the parent (children inherit the environment)."""
    return {**UVICORN, **HTTP_MODES[os.environ.get("STATELINE_BENCH_HTTP", "auto")]}


def _implementation(mode: str) -> str:
    """What uvicorn runs in ``mode``: its HTTP parser and event loop."""
    if mode == "h11":
        return "h11 on asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{parser} on {loop}"


DOC_BODY = {"n": 1, "name": "bench", "tags": ["a", "b"], "limits": {"rps": 100}}
CASE_BODY = {"mutations": [{"type": "increment_step_count"}]}
TX_BODY = {"ops": [{"op": "incr", "namespace": "bench", "key": "hits"}]}


# ---------------------------------------------------------------- the servers (child processes)


def _peer_apps(sample: dict[str, Any]) -> tuple[Any, Any]:
    """The bare Starlette app and the default FastAPI app, answering with stateline's sample bodies."""
    from fastapi import FastAPI  # noqa: PLC0415
    from pydantic import BaseModel  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import Response  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    doc_out = sample["doc"]
    case_out = sample["case"]
    tx_out = sample["tx"]

    async def bare_doc(request: Request) -> Response:
        orjson.loads(await request.body())
        out = {**doc_out, "key": request.path_params["key"]}
        return Response(orjson.dumps(out), media_type="application/json")

    async def bare_case(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(orjson.dumps(case_out), media_type="application/json")

    async def bare_tx(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(orjson.dumps(tx_out), media_type="application/json")

    bare = Starlette(
        routes=[
            Route("/v1/docs/{key}", bare_doc, methods=["PUT"]),
            Route("/v1/cases/{case_id}/commit", bare_case, methods=["POST"]),
            Route("/v1/transaction", bare_tx, methods=["POST"]),
        ]
    )

    class Limits(BaseModel):
        rps: int

    class Doc(BaseModel):
        n: int
        name: str
        tags: list[str]
        limits: Limits

    class Written(BaseModel):
        key: str
        version: int
        revision: int
        updated_at: int
        collection: str | None

    class Mutation(BaseModel):
        type: str
        by: int = 1

    class CaseCommit(BaseModel):
        mutations: list[Mutation]

    class CaseOut(BaseModel):
        case_id: str
        version: int
        receipt_seq: int
        state: dict[str, Any]

    class Receipt(BaseModel):
        case_id: str
        seq: int
        version: int
        timestamp: int
        mutations: list[dict[str, Any]]
        state_hash: str
        prev_hash: str
        hash: str
        revision: int | None

    class CommitOut(BaseModel):
        case: CaseOut
        receipt: Receipt

    class Op(BaseModel):
        op: str
        namespace: str
        key: str

    class TxIn(BaseModel):
        ops: list[Op]

    class Version(BaseModel):
        namespace: str
        key: str
        version: int

    class Counter(BaseModel):
        namespace: str
        key: str
        value: int

    class TxOut(BaseModel):
        revision: int
        committed_at: int
        versions: list[Version]
        counters: list[Counter]
        seqs: dict[str, int]

    fast = FastAPI()

    @fast.put("/v1/docs/{key}", response_model=Written)
    def fast_doc(key: str, body: Doc) -> Any:
        return {**doc_out, "key": key}

    @fast.post("/v1/cases/{case_id}/commit", response_model=CommitOut)
    def fast_case(case_id: str, body: CaseCommit) -> Any:
        return case_out

    @fast.post("/v1/transaction", response_model=TxOut)
    def fast_tx(body: TxIn) -> Any:
        return tx_out

    return bare, fast


def _maybe_without_audit(app: Any) -> None:
    """``--no-audit`` (a measurement aid, not a product setting): build each write's audit entry but
    commit none, to show what appending to the hash-chained audit log costs."""
    if os.environ.get("STATELINE_BENCH_NO_AUDIT"):
        app.state.stateline.auditor.append = lambda *args: None


def serve(kind: str, port: int, url: str, sample_path: str) -> None:
    """Run one contender (in a child process)."""
    import uvicorn  # noqa: PLC0415

    if kind == "stateline":
        import stateline  # noqa: PLC0415
        from stateline.api import ApiSettings, create_app  # noqa: PLC0415

        db = stateline.open(url)
        app = create_app(db, settings=ApiSettings(rate_limit=None))
        _maybe_without_audit(app)
    else:
        sample = orjson.loads(Path(sample_path).read_bytes())
        bare, fast = _peer_apps(sample)
        app = bare if kind == "bare" else fast
    uvicorn.run(app, port=port, **_server_options())


# ---------------------------------------------------------------- the load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One contender's process."""

    def __init__(self, kind: str, url: str, sample_path: str) -> None:
        self.kind = kind
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--serve",
                kind,
                "--port",
                str(self.port),
                "--url",
                url,
                "--sample",
                sample_path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.base + "/", timeout=1)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


LUA = """
local counter = 0
local n = {n}
local template = "{path}"
wrk.method = "{method}"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
request = function()
  counter = counter + 1
  local path = string.gsub(template, "#", tostring(counter % n))
  return wrk.format(nil, path)
end
"""


def wrk(
    base: str, method: str, path: str, body: dict[str, Any], token: str | None, n: int, seconds: float, conns: int
) -> tuple[float, float, float]:
    """Run wrk; returns (2xx requests/s, p50 ms, p99 ms)."""
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
    script = LUA.format(n=n, path=path, method=method, body=orjson.dumps(body).decode(), auth=auth)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        lua = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-s", lua, base],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(lua)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad_m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(bad_m.group(1)) if bad_m else 0
    good = rps * (total - bad) / total if total else 0.0

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return good, pct("50"), pct("99")


# ---------------------------------------------------------------- scenarios


def _key(url: str) -> str:
    """A key of tenant ``bench`` made directly in a shared store (SQLite); memory:// servers make their own."""
    import stateline  # noqa: PLC0415
    from stateline.api.auth import KeyStore  # noqa: PLC0415

    with stateline.open(url) as db:
        token, _ = KeyStore(db.store).create("bench", ["admin"])
    return token


def _sample(base: str, token: str) -> dict[str, Any]:
    """Stateline's answers, which the peers return byte for byte in shape."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        doc = c.put("/v1/docs/sample", json=DOC_BODY).json()
        case = c.post("/v1/cases/c0/commit", json=CASE_BODY).json()
        tx = c.post("/v1/transaction", json=TX_BODY).json()
    return {"doc": doc, "case": case, "tx": tx}


SCENARIOS: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("doc PUT", "PUT", "/v1/docs/k#", DOC_BODY, 1000),
    ("case commit", "POST", "/v1/cases/c#/commit", CASE_BODY, CASES),
    ("raw commit", "POST", "/v1/transaction", TX_BODY, 1),
]


def sse_latency(base: str, token: str, n: int) -> list[float]:
    """Seconds from sending a doc PUT to its event reaching an SSE client, ``n`` times."""
    h = {"Authorization": f"Bearer {token}"}
    arrived: dict[str, float] = {}
    ready = threading.Event()
    stop = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(timeout=60) as c,
            c.stream("GET", base + "/v1/watch", params={"namespace": "docs"}, headers=h) as r,
        ):
            ready.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.perf_counter()
                    for op in orjson.loads(line[6:])["ops"]:
                        arrived.setdefault(op["key"], now)
                if stop.is_set():
                    return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    ready.wait(10)
    time.sleep(0.3)
    out = []
    with httpx.Client(base_url=base, headers=h, timeout=30) as c:
        for i in range(n):
            key = f"sse-{i}-{time.monotonic_ns()}"
            sent = time.perf_counter()
            c.put(f"/v1/docs/{key}", json={"i": i})
            deadline = time.monotonic() + 5
            while key not in arrived and time.monotonic() < deadline:
                time.sleep(0.0005)
            if key in arrived:
                out.append(arrived[key] - sent)
            time.sleep(0.01)
    stop.set()
    return out


@contextlib.contextmanager
def backend_url(backend: str, tmp: Path, pg: str, redis_url: str) -> Iterator[str]:
    """The URL of a fresh store of ``backend``; a PostgreSQL schema or Redis key prefix of its own is
    dropped afterwards. Raises ``OSError`` when the server cannot be reached."""
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
    elif backend == "postgresql":
        import psycopg  # noqa: PLC0415

        schema = f"bench_http_{secrets.token_hex(4)}"
        try:
            psycopg.connect(pg, connect_timeout=5).close()
        except psycopg.Error as exc:
            raise OSError(f"PostgreSQL at {pg} is not reachable ({exc})") from None
        sep = "&" if "?" in pg else "?"
        try:
            yield f"{pg}{sep}schema={schema}"
        finally:
            with psycopg.connect(pg, autocommit=True, connect_timeout=10) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    elif backend == "redis":
        import redis  # noqa: PLC0415

        prefix = f"bench-http-{secrets.token_hex(4)}"
        client = redis.Redis.from_url(redis_url, socket_timeout=10)
        try:
            client.ping()
        except redis.RedisError as exc:
            client.close()
            raise OSError(f"Redis at {redis_url} is not reachable ({exc})") from None
        sep = "&" if "?" in redis_url else "?"
        try:
            yield f"{redis_url}{sep}prefix={prefix}"
        finally:
            try:
                batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for i in range(0, len(batch), 500):
                    client.unlink(*batch[i : i + 500])
            finally:
                client.close()
    else:
        raise ValueError(f"unknown backend {backend!r}")


@contextlib.contextmanager
def servers(backend: str, url: str, tmp: Path) -> Iterator[tuple[Server, Server, Server, str]]:
    sample_path = str(tmp / "sample.json")
    token = None
    if backend != "memory":
        token = _key(url)
    ours = Server("stateline", url, sample_path)
    try:
        if token is None:
            token = _memory_token(ours)
        with httpx.Client(base_url=ours.base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            for i in range(CASES):
                r = c.post("/v1/cases", json={"case_id": f"c{i}", "ctx": {"n": i}})
                assert r.status_code in (201, 409), r.text
        Path(sample_path).write_bytes(orjson.dumps(_sample(ours.base, token)))
        bare = Server("bare", "", sample_path)
        fast = Server("fastapi", "", sample_path)
        try:
            yield ours, bare, fast, token
        finally:
            bare.stop()
            fast.stop()
    finally:
        ours.stop()


def _memory_token(server: Server) -> str:
    # The memory store lives in the server process; the server makes the key (see --serve) and the
    # harness reads it back from the file named by STATELINE_BENCH_TOKEN.
    path = Path(os.environ["STATELINE_BENCH_TOKEN"])
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError("the memory server wrote no key")
        time.sleep(0.05)
    del server
    return path.read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (well under a minute)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one wrk run")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (median reported)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backends", default="memory,sqlite", help="any of " + ",".join(BACKENDS))
    parser.add_argument(
        "--http",
        choices=sorted(HTTP_MODES),
        default="auto",
        help="uvicorn's HTTP implementation for every contender: auto (as stateline serve: httptools and "
        "uvloop when installed) or h11 (pure Python, asyncio's loop)",
    )
    parser.add_argument("--pg", default=PG_DSN, help="PostgreSQL DSN (a schema of its own is made and dropped)")
    parser.add_argument("--redis", default=REDIS_URL, help="Redis URL (a key prefix of its own, deleted after)")
    parser.add_argument(
        "--no-audit", action="store_true", help="measurement aid: build each write's audit entry but commit none"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--sample", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.serve == "stateline" and args.url == "memory://":
            _serve_memory(args.port, args.sample)
            return
        serve(args.serve, args.port, args.url, args.sample)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    if args.quick:
        args.seconds, args.runs = 2.0, 1
    if args.no_audit:
        os.environ["STATELINE_BENCH_NO_AUDIT"] = "1"
    os.environ["STATELINE_BENCH_HTTP"] = args.http
    args.implementation = _implementation(args.http)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}: use any of {', '.join(BACKENDS)}")
    audit = "audit commits OFF (measurement aid)" if args.no_audit else "every write audited (group commit)"
    print(
        f"wrk -t1 -c{args.connections}, {args.seconds:g} s runs, median of {args.runs}; rate limit off; {audit}; "
        f"uvicorn with {args.implementation}"
    )
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            os.environ["STATELINE_BENCH_TOKEN"] = str(tmp / "token")
            try:
                store = backend_url(backend, tmp, args.pg, args.redis)
                url = store.__enter__()
            except OSError as exc:
                print(f"[{backend}] skipped: {exc}")
                continue
            try:
                run_backend(backend, url, tmp, args)
            finally:
                store.__exit__(None, None, None)


def run_backend(backend: str, url: str, tmp: Path, args: argparse.Namespace) -> None:
    """Every scenario and the SSE latency on one backend."""
    with servers(backend, url, tmp) as (ours, bare, fast, token):
        for name, method, path, body, n in SCENARIOS:
            results: dict[str, list[tuple[float, float, float]]] = {"stateline": [], "bare": [], "fastapi": []}
            order = [("stateline", ours), ("bare", bare), ("fastapi", fast)]
            for r in range(args.runs):
                for label, srv in order[r % 3 :] + order[: r % 3]:
                    results[label].append(wrk(srv.base, method, path, body, token, n, args.seconds, args.connections))
            med = {k: statistics.median(x[0] for x in v) for k, v in results.items()}
            p50 = {k: statistics.median(x[1] for x in v) for k, v in results.items()}
            p99 = {k: statistics.median(x[2] for x in v) for k, v in results.items()}
            r_bare = med["stateline"] / med["bare"]
            r_fast = med["stateline"] / med["fastapi"]
            print(
                f"[{backend}] {name:12s} stateline {med['stateline']:8.0f} req/s"
                f" (p50 {p50['stateline']:.2f} ms)"
                f" | bare Starlette {med['bare']:8.0f} ({r_bare:.2f}x)"
                f" | FastAPI+pydantic {med['fastapi']:8.0f} ({r_fast:.2f}x)"
            )
            common = {
                "bench": "http",
                "backend": backend,
                "unit": "req/s",
                "runs": args.runs,
                "seconds": args.seconds,
            }
            for peer, short, peer_name, target in (
                ("bare", "bare Starlette", "bare Starlette + orjson", 0.75),
                ("fastapi", "FastAPI + pydantic", "FastAPI + pydantic (defaults)", 1.5),
            ):
                record(
                    name=f"{name} vs {short}",
                    value=med["stateline"],
                    peer=peer_name,
                    peer_value=med[peer],
                    target=target if backend == "memory" and name != "raw commit" else None,
                    p50_ms=p50["stateline"],
                    p99_ms=p99["stateline"],
                    peer_p50_ms=p50[peer],
                    peer_p99_ms=p99[peer],
                    notes=f"uvicorn with {args.implementation}",
                    **common,
                )
        lat = sse_latency(ours.base, token, 20 if args.quick else 60)
        if lat:
            s = sorted(lat)
            p50_ms = statistics.median(s) * 1e3
            p99_ms = s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3
            print(
                f"[{backend}] commit -> SSE client: median {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms"
                f" over {len(s)} (from sending the PUT)"
            )
            record(
                bench="http",
                name="commit to SSE client latency",
                backend=backend,
                unit="ms",
                value=p50_ms,
                p50_ms=p50_ms,
                p99_ms=p99_ms,
                runs=len(s),
                notes="from sending a doc PUT to the event reaching a client of /v1/watch",
            )


def _serve_memory(port: int, sample_path: str) -> None:
    """The stateline server on memory://, which makes the bench key itself (the store is in this process)."""
    import uvicorn  # noqa: PLC0415

    import stateline  # noqa: PLC0415
    from stateline.api import ApiSettings, create_app  # noqa: PLC0415
    from stateline.api.auth import KeyStore  # noqa: PLC0415

    del sample_path
    db = stateline.open("memory://")
    token, _ = KeyStore(db.store).create("bench", ["admin"])
    Path(os.environ["STATELINE_BENCH_TOKEN"]).write_text(token)
    app = create_app(db, settings=ApiSettings(rate_limit=None))
    _maybe_without_audit(app)
    uvicorn.run(app, port=port, **_server_options())


if __name__ == "__main__":
    main()
