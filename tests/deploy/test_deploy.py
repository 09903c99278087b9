"""Deploy files agree with the code: compose services run real `palimpsest` commands,
environment names are real settings, and the Dockerfile's entry point exists.

Nothing here needs Docker; these are static checks of Dockerfile and docker-compose.yml.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from app.cli import cli
from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = {"migrate", "api", "worker", "webhooks", "beat"}

try:  # PyYAML is not a dependency; the tiny reader covers our subset when it is absent.
    import yaml as _yaml
except ImportError:  # pragma: no cover - depends on the environment
    _yaml = None


def load_compose() -> dict[str, Any]:
    from tests.support import miniyaml

    text = COMPOSE.read_text()
    doc = miniyaml.safe_load(text)
    if _yaml is not None:
        assert doc == _yaml.safe_load(text), "miniyaml and PyYAML disagree on docker-compose.yml"
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def interpolate(value: str) -> str:
    """Compose `${VAR:-default}` / `${VAR:?message}` / `${VAR}` with example values."""

    def sub(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3)
        return arg if op == ":-" else f"example-{m.group(1).lower()}-0123456789abcdef"

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:[-?])([^}]*))?\}", sub, value)


def as_args(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(x) for x in command]


def resolve(args: list[str]) -> tuple[Any, list[str], list[str]]:
    """Walk `palimpsest` subcommands; return the leaf command, its path and its own args.

    Duck-typed: recent Typer vendors its own copy of Click, so no `click.Group` checks.
    """
    cmd: Any = typer.main.get_command(cli)
    path: list[str] = []
    rest = list(args)
    while hasattr(cmd, "commands"):
        assert rest, f"`palimpsest {' '.join(path)}` needs a subcommand"
        sub = cmd.get_command(cmd.context_class(cmd), rest[0])
        assert sub is not None, f"`palimpsest {' '.join([*path, rest[0]])}` is not a command"
        path.append(rest.pop(0))
        cmd = sub
    return cmd, path, rest


def check_cli(args: list[str]) -> list[str]:
    """Fail unless `palimpsest ARGS` names a real command with options it accepts."""
    cmd, path, rest = resolve(args)
    # Parses options and arguments (unknown options, bad types fail) without running.
    cmd.make_context(" ".join(["palimpsest", *path]), list(rest))
    # And the help of that exact command renders through the real entry point.
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return path


# -- docker-compose.yml -----------------------------------------------------------------


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"postgres", "redis", *APP_SERVICES}


@pytest.mark.parametrize(
    ("service", "path"),
    [("migrate", ["db", "upgrade"]), ("api", ["api"]), ("worker", ["worker"]), ("beat", ["beat"])],
)
def test_service_commands_are_real(compose: dict[str, Any], service: str, path: list[str]) -> None:
    svc = compose["services"][service]
    assert check_cli(as_args(svc["command"])) == path


def test_api_listens_on_all_interfaces(compose: dict[str, Any]) -> None:
    args = as_args(compose["services"]["api"]["command"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = args[args.index("--port") + 1]
    assert any(str(p).endswith(f":{port}") for p in compose["services"]["api"].get("ports", []))


def test_the_workers_consume_every_queue(compose: dict[str, Any], tmp_path: Path) -> None:
    from workers.celery_app import create_celery

    queues: set[str] = set()
    for service in ("worker", "webhooks"):  # between them, the workers consume every queue
        args = as_args(compose["services"][service]["command"])
        queues |= set(args[args.index("--queues") + 1].split(","))
    # Local paths in tmp: building the Celery app creates the folders settings name.
    settings = Settings(
        broker_url="memory://",
        result_backend="cache+memory://",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        artifact_root=str(tmp_path / "artifacts"),
        signing_key_file=str(tmp_path / "signing-key.pem"),
    )
    declared = {q.name for q in create_celery(settings).conf.task_queues}
    assert queues == declared


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_environment_names_are_settings(compose: dict[str, Any], service: str) -> None:
    env = service_env(compose["services"][service])
    names = {k for k in env if k.startswith("PALIMPSEST_")}
    fields = {f"PALIMPSEST_{name.upper()}" for name in Settings.model_fields}
    assert names - fields == set(), "unknown settings"
    assert {
        "PALIMPSEST_DATABASE_URL",
        "PALIMPSEST_BROKER_URL",
        "PALIMPSEST_RESULT_BACKEND",
        "PALIMPSEST_ARTIFACT_ROOT",
    } <= names
    values = {k.removeprefix("PALIMPSEST_").lower(): interpolate(v) for k, v in env.items()}
    settings = Settings(**values)  # types and the production secret rule are validated
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert "@postgres:" in settings.database_url
    assert settings.broker_url.startswith("redis://redis:")
    assert not settings.is_sqlite


def test_services_share_the_artifacts_volume(compose: dict[str, Any]) -> None:
    mounts = {}
    for name in APP_SERVICES:
        svc = compose["services"][name]
        env = service_env(svc)
        volumes = [v for v in svc.get("volumes", []) if isinstance(v, str)]
        named = {v.split(":")[0]: v.split(":")[1] for v in volumes if not v.startswith((".", "/"))}
        target = next(
            (t for t in named.values() if env["PALIMPSEST_ARTIFACT_ROOT"].startswith(t)), None
        )
        assert target, f"{name}: the artifact root is not on a named volume"
        assert env["PALIMPSEST_SIGNING_KEY_FILE"].startswith(target)
        mounts[name] = next(k for k, t in named.items() if t == target)
    assert len(set(mounts.values())) == 1, mounts
    assert next(iter(mounts.values())) in (compose.get("volumes") or {})


def test_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "api", "worker", "beat"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep == "migrate" else "service_healthy"
            assert cond["condition"] == want, (name, dep, cond)
    for name in ("api", "worker", "beat"):
        assert "migrate" in services[name]["depends_on"], name
    assert "postgres" in services["migrate"]["depends_on"]


# -- Dockerfile -------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), rest
    return value


def test_dockerfile_base_and_user() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [rest for instr, rest in steps if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    order = [instr for instr, _ in steps]
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_dockerfile_entrypoint_and_cmd_are_real() -> None:
    steps = dict(dockerfile())
    entry = exec_form(steps["ENTRYPOINT"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["palimpsest"]
    assert scripts["palimpsest"] == "app.cli:main"
    assert check_cli(exec_form(steps["CMD"])) == ["api"]


def test_dockerfile_env_names_are_settings() -> None:
    fields = {f"PALIMPSEST_{name.upper()}" for name in Settings.model_fields}
    for instr, rest in dockerfile():
        if instr == "ENV":
            names = set(re.findall(r"(PALIMPSEST_[A-Z0-9_]+)=", rest))
            assert names <= fields, names - fields


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignored = {
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for instr, rest in dockerfile():
        if instr != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            if "*" in src:
                continue
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src not in ignored, f"COPY {src}: excluded by .dockerignore"
    # The package's own migrations must reach the image (`palimpsest db upgrade`).
    copied = " ".join(rest for instr, rest in dockerfile() if instr == "COPY")
    assert "migrations" in copied and "alembic.ini" in copied
