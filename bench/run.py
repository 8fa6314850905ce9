"""Run every benchmark under bench/ and write one report: results/latest.json, docs/benchmarks/ table and chart.

Run: ``make bench`` (or ``python bench/run.py``); ``--quick`` for a pass of about a minute or two,
``--only NAME`` (repeatable: ``store``, ``postgres``, ``redis``, ``streams``, ``cases``, ``runs``,
``runtime``, ``scaling``, ``locks``, ``http``, ...), ``--backend memory|sqlite|postgresql|redis``
(repeatable). Each script runs as a child process with ``STATELINE_BENCH_JSON`` naming a file where
it records its figures (see ``bench/harness.py``); its printed output is kept in
``bench/results/latest.json`` and quoted in the Markdown report. The physical floor
(``bench/floor.py``) always runs first, so every figure can be read beside the limits of the machine.

In full mode the scripts that take ``--seconds`` / ``--runs`` get 5 s runs, 3 of them (at least);
the others run their own full mode, whose rounds are listed with each figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from harness import ENV, load

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "benchmarks"
BACKENDS = ("memory", "sqlite", "postgresql", "redis")
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Script:
    """How to run one benchmark script: its backends, and how to narrow it to some of them."""

    name: str
    path: Path
    backends: tuple[str, ...] = BACKENDS
    backend_flag: str | None = None  # "--backends" (comma list) or "--only" (repeated)
    full_args: list[str] = field(default_factory=list)
    quick_args: list[str] = field(default_factory=lambda: ["--quick"])
    weight: float = 1.0  # rough share of the total time, for the progress bar

    def argv(self, quick: bool, backends: Iterable[str]) -> list[str] | None:
        """The command line, or None when none of ``backends`` concerns this script."""
        chosen = [b for b in self.backends if b in backends]
        if not chosen:
            return None
        args = list(self.quick_args if quick else self.full_args)
        if self.backend_flag == "--backends" and tuple(chosen) != self.backends:
            args += ["--backends", ",".join(chosen)]
        elif self.backend_flag == "--only" and tuple(chosen) != self.backends:
            for b in chosen:
                args += ["--only", b]
        return [sys.executable, str(self.path), *args]


FULL = ["--seconds", "5", "--runs", "3"]

KNOWN: dict[str, Script] = {
    s.name: s
    for s in (
        Script("floor", BENCH / "floor.py", ("memory", "sqlite", "postgresql", "redis"), weight=0.3),
        Script("store", BENCH / "bench_store.py", ("memory", "sqlite"), weight=1.0),
        Script("postgres", BENCH / "bench_postgres.py", ("postgresql",), full_args=FULL, weight=1.5),
        Script("redis", BENCH / "bench_redis.py", ("redis",), weight=1.0),
        Script("streams", BENCH / "bench_streams.py", ("memory", "sqlite", "postgresql"), backend_flag="--backends"),
        Script(
            "cases",
            BENCH / "bench_cases.py",
            ("memory", "sqlite", "postgresql"),
            backend_flag="--only",
            full_args=FULL,
            weight=2.0,
        ),
        Script("runs", BENCH / "bench_runs.py", ("sqlite", "postgresql"), backend_flag="--backends", weight=1.5),
        Script(
            "runtime",
            BENCH / "bench_runtime.py",
            ("memory", "redis"),
            backend_flag="--backends",
            full_args=FULL,
            weight=2.0,
        ),
        Script(
            "scaling",
            BENCH / "bench_scaling.py",
            ("memory", "sqlite", "postgresql"),
            backend_flag="--backends",
            weight=2.0,
        ),
        Script("locks", BENCH / "bench_locks.py", ("redis",), full_args=FULL, weight=1.0),
        Script("bus", BENCH / "bench_bus.py", ("memory", "sqlite"), weight=1.0),
        Script(
            "http",
            BENCH / "bench_http.py",
            ("memory", "sqlite", "postgresql", "redis"),
            backend_flag="--backends",
            weight=1.5,
        ),
    )
}


def discover() -> list[Script]:
    """The floor first, then every bench_*.py (known ones with their options, new ones with defaults)."""
    found = [KNOWN["floor"]]
    for path in sorted(BENCH.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        found.append(KNOWN.get(name) or Script(name, path))
    return [s for s in found if s.path.exists()]


# ---------------------------------------------------------------- conditions


def _quiet(fn: Any, default: Any = None) -> Any:
    try:
        return fn()
    except Exception:
        return default


def _git_head() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """Where and when the figures were taken, and the durability each server runs with."""
    cpu = ""
    info = Path("/proc/cpuinfo")
    if info.exists():
        m = re.search(r"model name\s*:\s*(.+)", info.read_text(errors="replace"))
        cpu = m.group(1).strip() if m else ""
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": _quiet(lambda: round(os.getloadavg()[0], 2)),
        "commit": _quiet(_git_head),
    }

    def pg() -> dict[str, str]:
        import psycopg  # noqa: PLC0415  # optional service

        with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3) as c:
            get = lambda q: str(c.execute(q).fetchone()[0])  # noqa: E731
            return {
                "version": get("SHOW server_version"),
                "synchronous_commit": get("SHOW synchronous_commit"),
                "fsync": get("SHOW fsync"),
            }

    def rd() -> dict[str, str]:
        import redis  # noqa: PLC0415  # optional service

        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        try:
            cfg = r.config_get("appendonly") | r.config_get("appendfsync") | r.config_get("save")
            return {"version": str(r.info("server")["redis_version"]), **{k: str(v) for k, v in cfg.items()}}
        finally:
            r.close()

    out["postgresql"] = _quiet(pg)
    out["redis"] = _quiet(rd)
    return out


# ---------------------------------------------------------------- running


def run_scripts(
    scripts: list[Script], quick: bool, backends: list[str], timeout: float, console: Console
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    plan = [(s, s.argv(quick, backends)) for s in scripts]
    plan = [(s, a) for s, a in plan if a is not None]
    total = sum(s.weight for s, _ in plan)
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[name]:<9}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[line]}", style="dim"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("bench", total=total, name="", line="")
        for script, argv in plan:
            assert argv is not None
            progress.update(task, name=script.name, line="starting")
            fd, jpath = tempfile.mkstemp(prefix=f"bench-{script.name}-", suffix=".jsonl")
            os.close(fd)
            env = {**os.environ, ENV: jpath, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
            started = time.perf_counter()
            lines: list[str] = []
            rc: int | str
            with subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line.rstrip("\n"))
                    progress.update(task, line=line.strip()[:70])
                    if time.perf_counter() - started > timeout:
                        proc.kill()
                        lines.append(f"(killed after {timeout:g} s)")
                        break
                rc = proc.wait()
            elapsed = time.perf_counter() - started
            got = load(jpath)
            os.unlink(jpath)
            got = [r for r in got if r.get("backend") not in BACKENDS or r.get("backend") in backends]
            results.extend(got)
            status = "ok" if rc == 0 else f"exit {rc}"
            runs.append(
                {
                    "name": script.name,
                    "argv": [Path(argv[1]).relative_to(ROOT).as_posix(), *argv[2:]],
                    "status": status,
                    "mode": "quick" if quick else "full",
                    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "seconds": round(elapsed, 1),
                    "figures": len(got),
                    "output": lines,
                }
            )
            colour = "green" if rc == 0 else "red"
            progress.console.print(
                f"[{colour}]{script.name}[/]: {status}, {len(got)} figures recorded, {elapsed:.0f} s"
            )
            if rc != 0:
                for line in lines[-8:]:
                    progress.console.print(f"    {line}", style="red", markup=False, highlight=False)
            progress.advance(task, script.weight)
    return results, runs


# ---------------------------------------------------------------- report


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return ""
    if unit in ("ms", "µs", "us", "s") or abs(v) < 10:
        text = f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    else:
        text = f"{v:,.0f}"
    return text


def _lat(p50: float | None, p99: float | None) -> str:
    if p50 is None:
        return ""
    return f"{p50:.3g} / {p99:.3g}" if p99 is not None else f"{p50:.3g}"


def internal(r: dict[str, Any]) -> bool:
    """Whether a figure compares stateline with itself (scaling, snapshots, threads) rather than with a peer."""
    if (r.get("extra") or {}).get("internal") is not None:
        return bool(r["extra"]["internal"])
    peer = (r.get("peer") or "").lower()
    return peer.startswith(("stateline", "same", "full replay", "case open"))


def floors(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per backend, the rate of its physical limit: fsync/s for SQLite, a ping's rate for servers."""
    out: dict[str, float] = {}
    for r in results:
        if r["bench"] != "floor":
            continue
        if r["backend"] == "disk" and "sqlite" not in out:
            out["sqlite"] = r["value"]
        elif r["backend"] in ("postgresql", "redis"):
            out[r["backend"]] = r["value"]
    return out


def modes(meta: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, str]:
    """The mode (quick or full) each script ran in."""
    default = "quick" if meta["quick"] else "full"
    return {r["name"]: r.get("mode", default) for r in runs}


def mode_text(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    by = modes(meta, runs)
    if set(by.values()) == {"quick"}:
        return "**quick** (short runs: indicative only)"
    if set(by.values()) == {"full"}:
        return "full (runs of 5 s where the script takes a run length)"
    full = ", ".join(n for n, md in by.items() if md == "full")
    quick = ", ".join(n for n, md in by.items() if md == "quick")
    dates = sorted({r.get("date", "") for r in runs if r.get("date")})
    return (
        f"**full** for {full}; **quick** (short runs, indicative only) for {quick}; "
        f"the scripts ran between {dates[0] if dates else '?'} and {dates[-1] if dates else '?'}"
    )


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    pg, rd = m.get("postgresql") or {}, m.get("redis") or {}
    by_mode = modes(meta, runs)
    lines = [
        "# Benchmarks",
        "",
        (
            "Generated by `make bench` (`python bench/run.py`, see the commands below); do not edit by hand. "
            "Every peer figure was measured in the same run as stateline's, "
            "the two taking turns so that a busy machine slows both alike."
        ),
        "",
        "## Conditions",
        "",
        f"- Date: {m['date']}; commit `{m.get('commit') or '?'}`; mode: {mode_text(meta, runs)}",
        (
            f"- Machine: {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), {m['os']}, Python {m['python']}, "
            f"load average {m.get('load_average')} at the start (the machine is shared: figures are noisy)"
        ),
        (
            f"- SQLite {m['sqlite']}: stateline in WAL mode with `synchronous=FULL` (every acknowledged commit is "
            "on disk); the peers on SQLite run `synchronous=FULL` too, unless a row says otherwise"
        ),
        (
            f"- PostgreSQL {pg.get('version', 'not reachable')}: "
            f"`synchronous_commit={pg.get('synchronous_commit', '?')}`, "
            f"`fsync={pg.get('fsync', '?')}`, the same server for stateline and its peers"
        ),
        (
            f"- Redis {rd.get('version', 'not reachable')}: `appendonly={rd.get('appendonly', '?')}`, "
            f"`appendfsync={rd.get('appendfsync', '?')}`, the same server for stateline and its peers "
            "(equal durability on both sides, as configured on the server)"
            + (
                ": with neither the append-only file nor snapshots, an acknowledged write survives no Redis restart"
                if rd.get("appendonly") == "no" and rd.get("save") == ""
                else ""
            )
        ),
        "- memory: stateline's in-process adapter beside the peer's in-process store; nothing survives the process",
        "",
        (
            "**Speed ratio** = how many times faster stateline is than the peer in the same run "
            "(its rate over the peer's, or the peer's time over its time): above 1 stateline is faster. "
            "**Target** is the minimum ratio the issue asked for. Latencies are p50 / p99 in ms where the "
            "script measures each operation. **× floor** is the figure over the rate of the physical limit "
            "of its backend (fsync/s for SQLite, a `SELECT 1` / `PING` round trip for PostgreSQL / Redis): "
            "group commit can carry several commits per flush, so it can exceed 1."
        ),
        "",
        "![Speed ratios of stateline over its peers](chart.png)",
        "",
    ]
    floor = [r for r in results if r["bench"] == "floor"]
    if floor:
        lines += [
            "## The physical floor",
            "",
            "| limit | rate | p50 / p99 ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['name']} | {_num(r['value'])} {r['unit']} | {_lat(r['p50_ms'], r['p99_ms'])} |" for r in floor]
        lines += [
            "",
            (
                "Measured at the start of the latest run. On a shared machine the disk's flush rate can change several "
                "fold from one minute to the next, so read × floor as an order of magnitude; scripts that depend on it "
                "(bench_store) also measure it in their own rounds and print it in their output below."
            ),
            "",
        ]
    fl = floors(results)
    others = [r for r in results if r["bench"] != "floor"]
    benches = list(dict.fromkeys(r["bench"] for r in others))
    for bench in benches:
        rows = [r for r in others if r["bench"] == bench]
        lines += [
            f"## {bench}" + (f" ({by_mode[bench]} mode)" if bench in by_mode else ""),
            "",
            (
                "| figure | backend | stateline | peer | peer figure | speed ratio | target | p50 / p99 ms "
                "(stateline; peer) | × floor | runs × s | durability (stateline; peer) |"
            ),
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            unit = r["unit"]
            ratio = f"**{r['ratio']:.2f}**" if r.get("ratio") is not None else ""
            target = ""
            if r.get("target") is not None:
                shown = f"{r['target']:.2f}" if r.get("peer") else f"{_num(r['target'])} {unit}"
                target = f"≥ {shown} " + ("✓" if r.get("met") else "✗")
            lat = _lat(r.get("p50_ms"), r.get("p99_ms"))
            if r.get("peer_p50_ms") is not None:
                lat += f"; {_lat(r['peer_p50_ms'], r.get('peer_p99_ms'))}"
            xfloor = ""
            f = fl.get(r["backend"])
            if f and "/s" in unit and r["backend"] in fl:
                xfloor = f"{r['value'] / f:.2f}"
            rs = ""
            if r.get("runs"):
                rs = f"{r['runs']}" + (f" × {r['seconds']:g}" if r.get("seconds") else "")
            dur = r.get("durability") or ""
            if r.get("peer_durability") and r["peer_durability"] != dur:
                dur += f"; {r['peer_durability']}"
            elif r.get("peer_durability"):
                dur = f"both: {dur}"
            peer_fig = f"{_num(r.get('peer_value'), unit)}" if r.get("peer_value") is not None else ""
            name = r["name"] + (f" ({r['notes']})" if r.get("notes") else "")
            lines.append(
                f"| {name} | {r['backend']} | {_num(r['value'], unit)} {unit} | {r.get('peer') or ''} | {peer_fig} "
                f"| {ratio} | {target} | {lat} | {xfloor} | {rs} | {dur} |"
            )
        lines.append("")
    lines += ["## Scripts and their output", ""]
    for run in runs:
        lines += [
            (
                f"<details><summary><code>{' '.join(run['argv'])}</code>: {run['status']}, "
                f"{run['figures']} figures, {run['seconds']:g} s</summary>"
            ),
            "",
            "```text",
            *run["output"],
            "```",
            "",
            "</details>",
            "",
        ]
    lines += [
        (
            "Reproduce: `pip install -e '.[bench]'` then `make bench` (every script in full mode: about 40 minutes "
            "on 2 cores) or `make bench ARGS=--quick` (about 5 minutes), with PostgreSQL on 127.0.0.1:5432 "
            "(user postgres, database test), Redis on 127.0.0.1:6379, NATS with JetStream on 127.0.0.1:4222 and "
            "`wrk` on the PATH. `make bench ARGS='--only store --backend sqlite'` narrows a run; "
            "`python bench/run.py --report-only --merge OTHER.json` rewrites this page from saved results."
        ),
        "",
    ]
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], meta: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  # only when writing the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in results if r.get("ratio") is not None and r.get("peer")]
    if not rows:
        return
    panels = [
        ("stateline / another library or driver, same work, same run", [r for r in rows if not internal(r)]),
        ("stateline / stateline (scaling, snapshots, group commit), same run", [r for r in rows if internal(r)]),
    ]
    panels = [(t, p) for t, p in panels if p]
    heights = [max(1.5, 0.3 * len(p) + 0.9) for _, p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(13, sum(heights) + 1.2),
        dpi=100,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    m = meta["machine"]
    used = set(modes(meta, runs).values())
    chart_mode = f"{used.pop()} run" if len(used) == 1 else "full and quick runs (see README.md)"
    fig.suptitle(
        f"stateline speed ratios: {m['date']}, {m['cores']} cores, {chart_mode}\n"
        f"SQLite synchronous=FULL; PostgreSQL synchronous_commit="
        f"{(m.get('postgresql') or {}).get('synchronous_commit', '?')}; Redis appendonly="
        f"{(m.get('redis') or {}).get('appendonly', '?')}, appendfsync={(m.get('redis') or {}).get('appendfsync', '?')}"
        "; each figure's durability on both sides is in README.md",
        fontsize=10,
    )
    for (title, prow), ax in zip(panels, axes[:, 0], strict=True):
        labels = [f"{r['bench']}: {r['name']} [{r['backend']}] / {r['peer']}" for r in prow]
        labels = [lb if len(lb) <= 95 else lb[:92] + "..." for lb in labels]
        ratios = [r["ratio"] for r in prow]
        colours = [
            ("#2a9d8f" if r["met"] else "#d62828") if r.get("met") is not None else ("#2a9d8f" if x >= 1 else "#f4a261")
            for r, x in zip(prow, ratios, strict=True)
        ]
        y = list(range(len(prow)))[::-1]
        ax.barh(y, ratios, color=colours, height=0.7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=1)
        for r, yy in zip(prow, y, strict=True):
            if r.get("target") is not None:
                ax.plot([r["target"]], [yy], marker="|", color="black", markersize=12, markeredgewidth=2)
        for yy, x in zip(y, ratios, strict=True):
            ax.text(x * 1.04, yy, f"{x:.2f}x", va="center", fontsize=8)
        ax.set_ylim(-0.7, len(prow) - 0.3)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlim(min(0.1, min(ratios) / 1.5), max(10.0, max(ratios) * 2.5))
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[-1, 0].set_xlabel(
        "speed ratio (log scale): > 1 stateline faster; black tick = target (green: met or > 1, red: target missed)"
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / (sum(heights) + 1.2)))
    fig.savefig(path)
    plt.close(fig)


def write_docs(
    meta: dict[str, Any], results: list[dict[str, Any]], runs: list[dict[str, Any]], console: Console
) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "README.md").write_text(markdown(meta, results, runs))
    chart(results, meta, runs, DOCS / "chart.png")
    console.print(f"wrote {(DOCS / 'README.md').relative_to(ROOT)} and {(DOCS / 'chart.png').relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script in its quick mode (a minute or two)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this script (repeatable)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="only these backends (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a script is stopped")
    parser.add_argument("--no-docs", action="store_true", help="write bench/results/latest.json only")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/benchmarks/ from latest.json")
    parser.add_argument(
        "--merge",
        action="append",
        type=Path,
        metavar="JSON",
        help="with --report-only: results of another run that replace latest.json's for the scripts they cover",
    )
    args = parser.parse_args(argv)
    console = Console()
    if args.report_only:
        saved = orjson.loads((RESULTS / "latest.json").read_bytes())
        for other in [saved, *(orjson.loads(path.read_bytes()) for path in args.merge or [])]:
            default = "quick" if other["meta"]["quick"] else "full"
            names = {r["name"] for r in other["scripts"]}
            for r in other["scripts"]:
                r.setdefault("mode", default)
                r.setdefault("date", other["meta"]["machine"]["date"])
            if other is not saved:
                for service in ("postgresql", "redis"):  # the same servers: keep the fullest description
                    if other["meta"]["machine"].get(service):
                        saved["meta"]["machine"][service] = other["meta"]["machine"][service]
                saved["results"] = [r for r in saved["results"] if r["bench"] not in names] + other["results"]
                saved["scripts"] = [r for r in saved["scripts"] if r["name"] not in names] + other["scripts"]
        order = {s.name: i for i, s in enumerate(discover())}
        saved["scripts"].sort(key=lambda r: order.get(r["name"], len(order)))
        saved["results"].sort(key=lambda r: order.get(r["bench"], len(order)))
        write_docs(saved["meta"], saved["results"], saved["scripts"], console)
        if args.merge:
            (RESULTS / "latest.json").write_bytes(orjson.dumps(saved, option=orjson.OPT_INDENT_2))
        return 0
    scripts = discover()
    if args.list:
        for s in scripts:
            console.print(f"{s.name:<10} {s.path.relative_to(ROOT)}  backends: {', '.join(s.backends)}")
        return 0
    if args.only:
        unknown = set(args.only) - {s.name for s in scripts}
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))} (see --list)")
        scripts = [s for s in scripts if s.name in args.only or s.name == "floor"]
    backends = list(args.backend or BACKENDS)
    meta: dict[str, Any] = {"quick": args.quick, "backends": backends, "machine": machine()}
    console.print(
        f"stateline benchmarks ({'quick' if args.quick else 'full'}): {', '.join(s.name for s in scripts)}; "
        f"backends {', '.join(backends)}; {meta['machine']['cores']} cores"
    )
    started = time.perf_counter()
    results, runs = run_scripts(scripts, args.quick, backends, args.timeout, console)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "results": results, "scripts": runs}
    (RESULTS / "latest.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    console.print(f"wrote {(RESULTS / 'latest.json').relative_to(ROOT)} ({len(results)} figures)")
    if not args.no_docs:
        write_docs(meta, results, runs, console)
    failed = [r["name"] for r in runs if r["status"] != "ok"]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
