"""`palimpsest demo`: the seed stories end to end on the embedded default.

Everything goes through real HTTP to a real API process, and the work is done by a real
Celery worker process on the SQLite broker, exactly as a portal and an administrator
would drive a deployment.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.demo_district import district_story
from app.demo_media import cv_text_story, esl_speech_story
from app.stack import LocalStack

# A fixed width keeps the report table readable when stdout is not a terminal.
console = Console(width=None if Console().is_terminal else 150)
TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}
DISTRICTS = ["district-a", "district-b", "district-c", "district-d", "district-e"]


def learning_dataset(n_subjects: int, seed: int = 7) -> bytes:
    """Students of five school districts (the sources), a few assessments each."""
    rng = np.random.default_rng(seed)
    lines = ["student,district,age,hours_study,prior_score,home_language,school_type,passed"]
    for s in range(n_subjects):
        district = DISTRICTS[s % len(DISTRICTS)]
        lang = rng.choice(["en", "es", "pl", "ar"], p=[0.55, 0.2, 0.15, 0.1])
        school = rng.choice(["public", "charter", "private"], p=[0.7, 0.2, 0.1])
        ability = rng.normal()
        for _ in range(int(rng.integers(2, 7))):
            hours = max(0.0, rng.normal(5, 2))
            prior = ability + rng.normal(scale=0.6)
            logit = 1.2 * ability + 0.25 * (hours - 5) + (0.4 if school == "private" else 0.0)
            passed = int(logit + rng.normal(scale=0.7) > 0)
            lines.append(
                f"s{s:05d},{district},{int(rng.integers(14, 19))},{hours:.2f},{prior:.3f},"
                f"{lang},{school},{passed}"
            )
    return ("\n".join(lines) + "\n").encode()


def _wait(
    progress: Progress, label: str, poll: Any, frac: Any, done: Any, timeout: float = 600
) -> dict[str, Any]:
    task = progress.add_task(label, total=1.0)
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = poll()
        progress.update(task, completed=min(1.0, frac(state)))
        if done(state):
            progress.update(task, completed=1.0)
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: still {json.dumps(state, default=str)[:500]}")
        time.sleep(0.25)


def _dataset(admin: httpx.Client, r: httpx.Response) -> dict[str, Any]:
    """The uploaded dataset, once ready: a large file answers 202 and is ingested by
    the worker (docs/datasets.md)."""
    r.raise_for_status()
    ds: dict[str, Any] = r.json()
    deadline = time.monotonic() + 600
    while ds.get("status", "ready") == "ingesting" and time.monotonic() < deadline:
        time.sleep(0.25)
        ds = admin.get(f"/v1/datasets/{ds['id']}").json()
    if ds.get("status", "ready") != "ready":
        raise RuntimeError(f"dataset {ds['name']}: {ds.get('status')} {ds.get('error') or ''}")
    return ds


REQUEST_STEPS = ["received", "planned", "unlearning", "verifying", "erasing", "completed"]


def _request_fraction(d: dict[str, Any]) -> float:
    s = d["status"]
    return REQUEST_STEPS.index(s) / (len(REQUEST_STEPS) - 1) if s in REQUEST_STEPS else 1.0


STORIES = ("erasure", "feature", "district", "cv-text", "esl-speech")


def run_demo(
    folder: Path | None,
    n_subjects: int = 3000,
    port: int = 0,
    serve: bool = False,
    stories: tuple[str, ...] = STORIES,
) -> int:
    work = folder or Path(tempfile.mkdtemp(prefix="palimpsest-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]Palimpsest demo[/bold]")
    console.print(f"work folder: {work} (SQLite database, SQLite broker, local artifacts)")
    stack = LocalStack(
        work,
        env={
            "PALIMPSEST_DEVICE": "auto",
            # Receivers of the demo (if any) listen on loopback, refused by default.
            "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        },
        port=port,
    )
    t_start = time.perf_counter()
    tables: list[Table] = []
    try:
        stack.start()
        console.print(f"API at {stack.base_url}, one Celery worker process")
        admin_key = stack.create_key("admin", "demo-admin")
        admin = httpx.Client(
            base_url=stack.base_url,
            timeout=60,
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        portal = httpx.Client(
            base_url=stack.base_url,
            timeout=60,
            headers={"Authorization": f"Bearer {stack.create_key('portal', 'privacy-portal')}"},
        )
        if "erasure" in stories:
            tables.append(_erasure_story(admin, portal, n_subjects))
        if "feature" in stories:
            tables.append(_feature_story(admin))
        if "district" in stories:
            tables.append(district_story(admin, portal, console, [sys.executable, "-m", "app.cli"]))
        if "cv-text" in stories:
            tables.append(cv_text_story(admin, console))
        if "esl-speech" in stories:
            tables.append(
                esl_speech_story(admin, portal, console, [sys.executable, "-m", "app.cli"])
            )
    except Exception as exc:
        stack.stop()
        console.print(f"[red]demo failed:[/red] {exc}")
        console.print(stack.tail(3000))
        return 1
    except KeyboardInterrupt:
        stack.stop()
        console.print("interrupted")
        return 130
    if not serve:
        stack.stop()
    for table in tables:
        console.print(table)
    console.print(
        f"demo finished in {time.perf_counter() - t_start:.0f} s; everything is in {work}"
    )
    if serve:
        return _serve(stack, admin_key)
    return 0


def _serve(stack: LocalStack, admin_key: str) -> int:
    """Keep the API and the worker running for the dashboard until Ctrl-C (or SIGTERM)."""

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a process started in the background by a shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt for it.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.rule("[bold]Dashboard[/bold]")
        # Plain lines, so that scripts (and the tests) can read them.
        print(f"dashboard: {stack.base_url}/admin", flush=True)
        print(f"admin key: {admin_key}", flush=True)
        print("serving until Ctrl-C", flush=True)
        while all(p.poll() is None for p in stack.procs):
            time.sleep(0.5)
        console.print("[red]the service stopped on its own[/red]")
        console.print(stack.tail(3000))
        return 1
    except KeyboardInterrupt:
        print("stopping the API and the worker", flush=True)
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _erasure_story(admin: httpx.Client, portal: httpx.Client, n_subjects: int) -> Table:
    console.rule("Story 3 and 2: erase people, withdraw a district (SISA, exact)")
    data = learning_dataset(n_subjects)
    spec = {
        "name": "esl-assessments",
        "subject_column": "student",
        "label_column": "passed",
        "source_column": "district",
        "group_columns": ["home_language"],
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("esl.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    ds = _dataset(admin, r)
    console.print(
        f"dataset {ds['name']}: {ds['n_records']} records, {ds['n_subjects']} students, "
        f"sources {', '.join(ds['sources'])}"
    )
    # Two models on the same data: sharded by student (one person touches one shard) and
    # by district (withdrawing a district retrains only that district's shards).
    models = {"esl-by-student": "subject", "esl-by-district": "source"}
    jobs = {}
    for name, sharding in models.items():
        r = admin.post(
            "/v1/models",
            json={
                "name": name,
                "dataset_id": ds["id"],
                "architecture": {"kind": "mlp", "hidden": [32]},
                "training": {"epochs": 6, "batch_size": 64, "lr": 0.01, "seed": 3},
                "unlearning": {"mode": "sisa", "shards": 8, "slices": 4, "sharding": sharding},
            },
        )
        r.raise_for_status()
        jobs[name] = r.json()["job_id"]
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        for name, job_id in jobs.items():
            job = _wait(
                progress,
                f"training {name}: 8 shards x 4 slices",
                lambda job_id=job_id: admin.get(f"/v1/jobs/{job_id}").json(),
                lambda j: j["progress"],
                lambda j: j["status"] in ("succeeded", "failed"),
            )
            if job["status"] != "succeeded":
                raise RuntimeError(f"training {name} failed: {job.get('error')}")
    for name in models:
        model = admin.get(f"/v1/models/{name}").json()
        acc = model["versions"][0]["metrics"]["test_accuracy"]
        console.print(f"{name}: version 1 in production, test accuracy {acc:.3f}")

    subjects = [f"s{i:05d}" for i in (3, 11, 42)]
    requests = []
    for sid in subjects:
        r = portal.post(
            "/v1/deletion-requests",
            json={"kind": "subject", "subject_id": sid, "reason": "GDPR Art. 17"},
            headers={"Idempotency-Key": f"demo-{sid}"},
        )
        r.raise_for_status()
        requests.append((f"subject {sid}", r.json()["id"]))
    finished = _follow(portal, requests)
    r = portal.post(
        "/v1/deletion-requests",
        json={
            "kind": "source",
            "source": "district-a",
            "reason": "district withdrew from the project",
        },
    )
    r.raise_for_status()
    finished += _follow(portal, [("source district-a", r.json()["id"])])
    return _summary(admin, finished)


def cv_dataset(n: int = 4000, seed: int = 11) -> bytes:
    """CV screening: historical hiring decisions that rewarded a driving licence."""
    rng = np.random.default_rng(seed)
    lines = [
        "candidate,agency,years_experience,skills_score,education,driving_licence,region,hired"
    ]
    for i in range(n):
        years = float(rng.gamma(2.0, 3.0))
        skills = float(rng.normal())
        education = rng.choice(["secondary", "bachelor", "master"], p=[0.4, 0.45, 0.15])
        licence = rng.choice(["yes", "no"], p=[0.6, 0.4])
        region = rng.choice(["urban", "rural"], p=[0.7, 0.3])
        merit = (
            1.1 * skills
            + 0.12 * (years - 6)
            + {"secondary": -0.3, "bachelor": 0.1, "master": 0.4}[education]
        )
        bias = 1.2 if licence == "yes" else -0.6  # what the firm no longer wants
        hired = int(merit + bias + rng.normal(scale=0.6) > 0.3)
        lines.append(
            f"c{i:05d},agency-{i % 3},{years:.1f},{skills:.3f},"
            f"{education},{licence},{region},{hired}"
        )
    return ("\n".join(lines) + "\n").encode()


def _scores(admin: httpx.Client, model: str, records: list[dict[str, Any]]) -> np.ndarray:
    r = admin.post(f"/v1/models/{model}/predict", json={"records": records})
    r.raise_for_status()
    return np.asarray([p["score"] for p in r.json()["predictions"]])


def _licence_effect(
    admin: httpx.Client, model: str, people: list[dict[str, Any]]
) -> dict[str, float]:
    """Score change when only the licence is flipped, and the mean gap between
    candidates with and without one."""
    base = _scores(admin, model, people)
    flipped = [
        p | {"driving_licence": "no" if p["driving_licence"] == "yes" else "yes"} for p in people
    ]
    moved = np.abs(_scores(admin, model, flipped) - base)
    has = np.asarray([p["driving_licence"] == "yes" for p in people])
    return {
        "max_flip": float(moved.max()),
        "mean_flip": float(moved.mean()),
        "gap": float(base[has].mean() - base[~has].mean()),
    }


def _feature_story(admin: httpx.Client) -> Table:
    console.rule("Story 1: stop a CV-ranking model from rewarding a driving licence")
    data = cv_dataset()
    spec = {
        "name": "cv-screening",
        "subject_column": "candidate",
        "label_column": "hired",
        "source_column": "agency",
        "group_columns": ["region"],
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("cv.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    ds = _dataset(admin, r)
    r = admin.post(
        "/v1/models",
        json={
            "name": "cv-ranker",
            "dataset_id": ds["id"],
            "architecture": {"kind": "logreg"},
            "training": {"epochs": 20, "batch_size": 128, "lr": 0.05, "seed": 5},
            "unlearning": {"mode": "monolithic"},
            "feature_columns": ["years_experience", "skills_score", "education", "driving_licence"],
        },
    )
    r.raise_for_status()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    ]
    job_id = r.json()["job_id"]
    with Progress(*columns, console=console) as progress:
        job = _wait(
            progress,
            "training cv-ranker (monolithic logistic)",
            lambda: admin.get(f"/v1/jobs/{job_id}").json(),
            lambda j: j["progress"],
            lambda j: j["status"] in ("succeeded", "failed"),
        )
    if job["status"] != "succeeded":
        raise RuntimeError(f"training cv-ranker failed: {job.get('error')}")
    rng = np.random.default_rng(1)
    people = []
    for line in data.decode().splitlines()[1:][::8][:400]:
        _, _, years, skills, edu, licence, _, _ = line.split(",")
        people.append(
            {
                "years_experience": float(years),
                "skills_score": float(skills),
                "education": edu,
                "driving_licence": licence,
            }
        )
    rng.shuffle(people)
    before = _licence_effect(admin, "cv-ranker", people)
    r = admin.post(
        "/v1/deletion-requests",
        json={
            "kind": "feature",
            "model": "cv-ranker",
            "feature": "driving_licence",
            "reason": "the licence is no longer a job requirement",
        },
    )
    r.raise_for_status()
    rid = r.json()["id"]
    ((_, d),) = _follow(admin, [("feature driving_licence", rid)])
    if d["status"] == "needs_review":
        # The historical labels rewarded the licence, so accuracy against them must drop
        # once the model ignores it: the utility gate stops the promotion and asks a human.
        report = admin.get(f"/v1/reports/{d['models'][0]['report_id']}").json()
        for name, check in report["checks"].items():
            verdict = "pass" if check["passed"] else "FAIL"
            console.print(f"  check {name}: {verdict} {check['metrics']}")
        note = "accuracy drop is the removed bias: the labels historically rewarded the licence"
        console.print(f"  admin review: approve ({note})")
        r = admin.post(
            f"/v1/deletion-requests/{rid}/review", json={"action": "approve", "note": note}
        )
        r.raise_for_status()
        ((_, d),) = _follow(admin, [("feature driving_licence (approved)", rid)])
    after = _licence_effect(admin, "cv-ranker", people)
    model = admin.get("/v1/models/cv-ranker").json()
    versions = {v["version"]: v for v in model["versions"]}
    (m,) = d["models"]
    acc_before = versions[m["from_version"]]["metrics"].get("test_accuracy")
    acc_after = versions.get(m["to_version"], {}).get("metrics", {}).get("test_accuracy")
    table = Table(title=f"cv-ranker: forgetting 'driving_licence' ({d['status']}, {m['method']})")
    for col in (
        "",
        "version",
        "max score change on flip",
        "mean score change on flip",
        "mean score gap licence vs none",
        "test accuracy",
    ):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(
        "before",
        f"v{m['from_version']}",
        fmt(before["max_flip"]),
        fmt(before["mean_flip"]),
        fmt(before["gap"]),
        fmt(acc_before),
    )
    table.add_row(
        "after",
        f"v{m['to_version']}",
        fmt(after["max_flip"]),
        fmt(after["mean_flip"]),
        fmt(after["gap"]),
        fmt(acc_after),
    )
    return table


def fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "-"


def _follow(
    portal: httpx.Client, requests: list[tuple[str, str]]
) -> list[tuple[str, dict[str, Any]]]:
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    ]
    out = []
    with Progress(*columns, console=console) as progress:
        for label, rid in requests:
            d = _wait(
                progress,
                f"erasing {label}",
                lambda rid=rid: portal.get(f"/v1/deletion-requests/{rid}").json(),
                _request_fraction,
                lambda d: d["status"] in TERMINAL,
            )
            out.append((label, d))
    return out


def _summary(admin: httpx.Client, finished: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title="Deletion requests: every model each one reached")
    for col in (
        "request",
        "model",
        "status",
        "versions",
        "method",
        "shards retrained",
        "unlearning s",
        "retrain-all s",
        "speed-up",
        "accuracy before",
        "accuracy after",
    ):
        left = col in ("request", "model", "status", "method")
        table.add_column(col, justify="left" if left else "right")
    seen_jobs: set[str] = set()
    for label, d in finished:
        for m in d["models"]:
            job = admin.get(f"/v1/jobs/{m['job_id']}").json()
            un = job.get("result", {}).get("unlearning", {})
            shards = (
                f"{len(un.get('affected_shards', []))}/{un.get('total_shards', '?')}" if un else "-"
            )
            t = job["cost"].get("device_seconds") or 0.0
            full = job["cost"].get("retrain_estimate_seconds") or 0.0
            report = admin.get(f"/v1/reports/{m['report_id']}").json() if m.get("report_id") else {}
            util = report.get("checks", {}).get("utility", {}).get("metrics", {})
            batched = " (batched)" if m["job_id"] in seen_jobs else ""
            seen_jobs.add(m["job_id"])
            table.add_row(
                label,
                m["model"],
                d["status"],
                f"v{m['from_version']} -> v{m['to_version']}",
                f"{m['method']}{batched}",
                shards,
                f"{t:.2f}",
                f"{full:.2f}",
                f"{full / t:.1f}x" if t > 0 else "-",
                f"{util['baseline_accuracy']:.3f}" if util else "-",
                f"{util['candidate_accuracy']:.3f}" if util else "-",
            )
    return table
