"""The `palimpsest` command line."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Annotated

import typer

cli = typer.Typer(
    help="Palimpsest: right-to-be-forgotten requests with machine unlearning.", no_args_is_help=True
)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
audit_cli = typer.Typer(help="The audit log.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(audit_cli, name="audit")


def alembic_config(url: str | None = None) -> object:
    from alembic.config import Config

    import migrations
    from app.core.settings import get_settings

    # The migrations ship as a package, so an installed wheel finds them too.
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade_database(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    from app.core.settings import get_settings

    get_settings().ensure_local_dirs()
    command.upgrade(alembic_config(url), revision)  # type: ignore[arg-type]


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations to PALIMPSEST_DATABASE_URL."""
    upgrade_database(revision=revision)
    typer.echo(f"database at {revision}")


@db_cli.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (`base` for an empty schema)."""
    from alembic import command

    command.downgrade(alembic_config(), revision)  # type: ignore[arg-type]
    typer.echo(f"database at {revision}")


@keys_cli.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | portal | auditor")],
    name: Annotated[str, typer.Option(help="who holds the key")],
) -> None:
    """Create an API key; the key alone is printed on the last line."""
    from app.core.db import session_scope
    from app.keys import create_key

    try:
        with session_scope() as s:
            key, raw = create_key(s, role, name)
            key_id = key.id
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"created {role} key {key_id} for {name!r}; store it now, it is not shown again:")
    typer.echo(raw)


# Seconds between the interpreter's thread switches in an API process (`served_app`).
API_SWITCH_INTERVAL = 0.0002


def served_app() -> object:
    """The factory each API process calls: with several workers uvicorn spawns fresh
    interpreters, so each sets up our logging itself."""
    from app.core.logging import configure_logging
    from app.core.settings import get_settings
    from app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app()
    # Everything loaded so far (the app, its libraries) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it, which would
    # pause every request in flight for tens of milliseconds.
    gc.freeze()
    # Two busy threads share the interpreter here: the event loop and intake's writer
    # (app/requests/intake.py), which needs it back each time one of its group's eight
    # database round trips returns. At the default 5 ms it can wait that long behind
    # the event loop after each; B9 in paired runs: 0.2 ms took intake from 912 to
    # 1,223 requests/s and its p99 from 75 to 47 ms (docs/benchmarks.md).
    sys.setswitchinterval(API_SWITCH_INTERVAL)
    return app


@keys_cli.command("list")
def keys_list(
    live: Annotated[bool, typer.Option("--live", help="only keys that are not revoked")] = False,
) -> None:
    """List keys (id, role, name, prefix, created, revoked); never their secrets."""
    from app.core.db import session_scope
    from app.keys import list_keys

    with session_scope() as s:
        rows = [
            (k.id, k.role, k.name, k.prefix, k.created_at, k.revoked_at)
            for k in list_keys(s, include_revoked=not live)
        ]
    typer.echo("id\trole\tname\tprefix\tcreated_at\trevoked_at")
    for kid, role, name, prefix, created, revoked in rows:
        when = revoked.isoformat(timespec="seconds") if revoked else "-"
        typer.echo(
            f"{kid}\t{role}\t{name}\t{prefix}\t{created.isoformat(timespec='seconds')}\t{when}"
        )


@keys_cli.command("revoke")
def keys_revoke(
    id_or_name: Annotated[str, typer.Argument(help="the key's id, or the name of one live key")],
) -> None:
    """Revoke a key at once (API calls and dashboard sessions)."""
    from app.core.db import session_scope
    from app.core.errors import AppError
    from app.keys import find_key, revoke_key

    try:
        with session_scope() as s:
            key = revoke_key(s, find_key(s, id_or_name))
            kid, name, role = key.id, key.name, key.role
    except AppError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1 if exc.status_code == 409 else 2) from exc
    typer.echo(f"revoked {role} key {kid} ({name!r})")


@cli.command("api")
def api(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="processes; default PALIMPSEST_API_WORKERS (the core count)"),
    ] = None,
) -> None:
    """Serve the HTTP API (uvicorn, several processes sharing the port)."""
    import uvicorn

    from app.core.logging import configure_logging
    from app.core.settings import get_settings

    settings = get_settings()
    settings.ensure_local_dirs()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "app.cli:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers or settings.api_workers,
        log_level="info",
        log_config=None,  # keep our JSON handler: uvicorn's records flow through root
        access_log=False,  # app.main logs each request, with its id and redacted paths
    )


@cli.command("worker")
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "gpu,default,webhooks",
    concurrency: Annotated[int | None, typer.Option()] = None,
    pool: Annotated[str | None, typer.Option(help="solo | threads | prefork")] = None,
    loglevel: str = "INFO",
    beat: Annotated[
        bool, typer.Option("--beat", help="also run the scheduler in this process (embedded)")
    ] = False,
) -> None:
    """Run a Celery worker for the configured broker."""
    from app.core.settings import get_settings
    from workers.celery_app import get_celery

    settings = get_settings()
    settings.ensure_local_dirs()
    argv = [
        "worker",
        f"--queues={queues}",
        f"--pool={pool or settings.worker_pool}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        # The embedded shape runs one process: the resume sweep lives in it.
        argv += ["--beat", f"--schedule={settings.beat_schedule_file}"]
    get_celery().worker_main(argv)


@cli.command("beat")
def beat(loglevel: str = "INFO") -> None:
    """Run the periodic scheduler (resumes stalled work)."""
    from app.core.settings import get_settings
    from workers.celery_app import get_celery

    settings = get_settings()
    settings.ensure_local_dirs()
    get_celery().start(
        ["beat", f"--loglevel={loglevel}", f"--schedule={settings.beat_schedule_file}"]
    )


@audit_cli.command("verify")
def audit_verify() -> None:
    """Recompute the audit hash chain; exit 0 only if intact."""
    from app.audit.service import verify_chain
    from app.core.db import session_scope

    with session_scope() as s:
        check = verify_chain(s)
    if check.intact:
        typer.echo(f"audit chain intact: {check.events} events")
        return
    typer.echo(f"audit chain BROKEN at event {check.first_bad_id}: {check.reason}", err=True)
    raise typer.Exit(1)


@cli.command("verify-certificate")
def verify_certificate(
    file: Annotated[Path, typer.Argument(help="the certificate (JSON) to check")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key", help="PEM public key (default: the configured signing key file)"
        ),
    ] = None,
) -> None:
    """Verify a certificate offline; exit 0 only if it is valid (1: invalid, 2: unreadable)."""
    import json

    from app.core import signing
    from app.core.settings import get_settings

    try:
        signed = json.loads(file.read_bytes())
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        typer.echo(f"error: {file} is not a JSON document: {exc}", err=True)
        raise typer.Exit(2) from exc
    key_file = public_key or Path(get_settings().signing_key_file)
    try:
        key = signing.load_public_key(key_file)
    except (OSError, ValueError) as exc:
        typer.echo(f"invalid: cannot load a public key from {key_file}: {exc}", err=True)
        raise typer.Exit(1) from exc
    reason = signing.check(signed, key)
    if reason is not None:
        typer.echo(f"invalid: {reason}", err=True)
        raise typer.Exit(1)
    typer.echo("valid")


@cli.command("demo")
def demo(
    folder: Annotated[
        Path | None, typer.Option(help="work folder (default: a new temp folder)")
    ] = None,
    subjects: Annotated[int, typer.Option(help="students in the synthetic dataset")] = 3000,
    port: int = 0,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="afterwards keep the API and worker running for the dashboard until Ctrl-C",
        ),
    ] = False,
    stories: Annotated[
        str, typer.Option(hidden=True, help="comma-separated subset of the stories")
    ] = "erasure,feature,district,cv-text,esl-speech",
) -> None:
    """Run the seed stories end to end on the embedded default and print a report."""
    from app.demo import STORIES, run_demo

    chosen = tuple(s.strip() for s in stories.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(STORIES))
    if unknown:
        typer.echo(f"error: unknown stories {unknown}; known: {list(STORIES)}", err=True)
        raise typer.Exit(2)
    sys.exit(run_demo(folder, n_subjects=subjects, port=port, serve=serve, stories=chosen))


def main() -> None:
    from pydantic import ValidationError

    try:
        cli()
    except ValidationError as exc:
        # Settings refused (production without its secrets, a malformed value): say
        # which, without a traceback.
        if exc.title != "Settings":
            raise
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            typer.echo(f"error: invalid settings: {where + ': ' if where else ''}{msg}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
