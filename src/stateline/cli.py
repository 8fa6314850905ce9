"""The ``stateline`` command line."""

from __future__ import annotations

import orjson
import typer
from rich.console import Console

import stateline
from stateline.database import DEFAULT_URL
from stateline.errors import StatelineError
from stateline.types import Put

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Durable, multi-tenant state.")
console = Console()

URL_OPTION = typer.Option(DEFAULT_URL, "--url", envvar="STATELINE_URL", help="Store URL.")
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


def main() -> None:
    """Entry point of the ``stateline`` script."""
    try:
        app()
    except StatelineError as exc:
        console.print(f"[red]error[/red] {exc.code}: {exc.message}")
        raise SystemExit(2) from None
