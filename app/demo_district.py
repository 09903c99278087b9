"""Story 2 of the demo: a district withdraws, and unlearning silently hurts students who
share its home language. Verification must catch it before promotion, report it per
group, and offer a mitigation; the completed request ends with a verifiable certificate.
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from app.requests.service import MITIGATIONS

TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}
DISTRICT_A = "district-000"
LANGUAGE = "tl"  # most of its speakers study in district A


def district_dataset(n_students: int = 6000, seed: int = 21) -> bytes:
    """ESL assessments from 100 districts. District A holds most students whose home
    language is `tl`. Both `tl` and `pl` speakers carry an accent, but the written score
    under-states `tl` speakers' ability (they pass more often than it suggests) and
    over-states `pl` speakers'. The model sees the accent, not the language. Elsewhere
    the two effects cancel out (twice as many `pl` as `tl` speakers), so what the model
    knows about accented `tl` speakers it learns from district A; without A they are
    judged by the written score alone and marked harshly."""
    rng = np.random.default_rng(seed)
    lines = ["student,district,prior_score,hours_study,home_language,accent,passed"]
    offset = {LANGUAGE: 2.0, "pl": -1.0}
    for s in range(n_students):
        if s < n_students * 2 // 5:  # a large district
            district = DISTRICT_A
            lang = LANGUAGE if rng.random() < 0.85 else str(rng.choice(["en", "es"]))
        else:
            district = f"district-{1 + s % 99:03d}"
            lang = str(rng.choice(["en", "es", "pl", LANGUAGE], p=[0.45, 0.25, 0.2, 0.1]))
        for _ in range(int(rng.integers(1, 4))):
            score = float(rng.normal())
            hours = max(0.0, float(rng.normal(5, 2)))
            accent = float(rng.normal(1.0 if lang in offset else 0.0, 0.25))
            logit = 1.4 * score + 0.2 * (hours - 5) + offset.get(lang, 0.0)
            passed = int(logit + rng.normal(scale=0.5) > 0.4)
            lines.append(
                f"s{s:05d},{district},{score:.3f},{hours:.2f},{lang},{accent:.3f},{passed}"
            )
    return ("\n".join(lines) + "\n").encode()


def _get(client: httpx.Client, url: str) -> dict[str, Any]:
    r = client.get(url)
    r.raise_for_status()
    return dict(r.json())


def _settle(client: httpx.Client, rid: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = _get(client, f"/v1/deletion-requests/{rid}")
        if d["status"] in TERMINAL:
            return d
        if time.monotonic() > deadline:
            raise TimeoutError(f"request {rid} still {d['status']}")
        time.sleep(0.3)


def _group_rows(check: dict[str, Any], group: str) -> tuple[float | None, float | None]:
    m = check.get("metrics", {})
    before = next((g for g in m.get("before", []) if g["group"] == group), None)
    after = next((g for g in m.get("after", []) if g["group"] == group), None)
    return (before or {}).get("accuracy"), (after or {}).get("accuracy")


def district_story(
    admin: httpx.Client, portal: httpx.Client, console: Console, cli: list[str]
) -> Table:
    console.rule("Story 2: district A withdraws; its home language must not pay for it")
    spec = {
        "name": "esl-100-districts",
        "subject_column": "student",
        "label_column": "passed",
        "source_column": "district",
        "group_columns": ["home_language"],
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("esl100.csv", io.BytesIO(district_dataset()), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    r.raise_for_status()
    ds = r.json()
    console.print(f"dataset: {ds['n_records']} records, {len(ds['sources'])} districts")
    r = admin.post(
        "/v1/models",
        json={
            "name": "esl-100",
            "dataset_id": ds["id"],
            "architecture": {"kind": "mlp", "hidden": [16]},
            "training": {"epochs": 6, "batch_size": 64, "lr": 0.01, "seed": 7},
            "unlearning": {"mode": "sisa", "shards": 5, "slices": 2, "sharding": "source"},
            "group_columns": ["home_language"],
            # The language is a group to judge fairness by, not an input of the model.
            "feature_columns": ["prior_score", "hours_study", "accent"],
        },
    )
    r.raise_for_status()
    job_id = r.json()["job_id"]
    while (job := _get(admin, f"/v1/jobs/{job_id}"))["status"] not in ("succeeded", "failed"):
        time.sleep(0.3)
    if job["status"] != "succeeded":
        raise RuntimeError(f"training esl-100 failed: {job.get('error')}")
    r = portal.post(
        "/v1/deletion-requests",
        json={
            "kind": "source",
            "source": DISTRICT_A,
            "reason": "district withdrew from the project",
        },
    )
    r.raise_for_status()
    rid = r.json()["id"]
    d = _settle(portal, rid)
    (m,) = d["models"]
    first = _get(admin, f"/v1/reports/{m['report_id']}")
    job = _get(admin, f"/v1/jobs/{m['job_id']}")
    un = job["result"].get("unlearning", {})
    forgetting = first["checks"].get("forgetting", {}).get("metrics", {})
    fair = first["checks"].get("fairness", {})
    flagged = fair.get("metrics", {}).get("flagged", [])
    console.print(
        f"unlearning retrained {len(un.get('affected_shards', []))} of {un.get('total_shards')} "
        f"shards; request is {d['status']} (decision {first['decision']})"
    )
    for f in flagged:
        console.print(
            f"  [red]flagged[/red] {f['column']}={f['group']}: {f['metric']} "
            f"{f['before']:.3f} -> {f['after']:.3f} (n={f['n']})"
        )
    # Each mitigation runs as a retrain verified like any candidate; the first that
    # clears every check is promoted; otherwise the admin approves the best achievable.
    tried: dict[str, dict[str, Any]] = {}
    if d["status"] == "needs_review":
        for kind in MITIGATIONS:
            console.print(f"  admin review: mitigate with {kind} ({MITIGATIONS[kind]})")
            r = admin.post(
                f"/v1/deletion-requests/{rid}/review",
                json={"action": "mitigate", "mitigation": kind, "note": f"try {kind}"},
            )
            r.raise_for_status()
            d = _settle(portal, rid)
            (m2,) = d["models"]
            tried[kind] = (
                _get(admin, f"/v1/reports/{m2['report_id']}") if m2.get("report_id") else {}
            )
            fair2 = tried[kind].get("checks", {}).get("fairness", {})
            flagged2 = [
                f"{f['group']} {f['metric']} {_f(f['before'])}->{_f(f['after'])}"
                for f in (fair2.get("metrics") or {}).get("flagged", [])
            ]
            console.print(
                f"    {LANGUAGE} accuracy {_f(_group_rows(fair2, LANGUAGE)[1])}, "
                f"fairness {fair2.get('status', '-')} (flagged: {'; '.join(flagged2) or 'none'}),"
                f" decision {tried[kind].get('decision')}"
            )
            if d["status"] != "needs_review":
                console.print(f"  [green]{kind} cleared every check and was promoted[/green]")
                break
        if d["status"] == "needs_review":
            best = max(
                tried,
                key=lambda k: (
                    _group_rows(tried[k].get("checks", {}).get("fairness", {}), LANGUAGE)[1] or 0.0
                ),
            )
            console.print(
                f"  no mitigation cleared the check; the best achievable is {best}: the admin "
                "approves it with a note (the trade-off is in its report)"
            )
            r = admin.post(
                f"/v1/deletion-requests/{rid}/review",
                json={
                    "action": "approve",
                    "mitigation": best,
                    "note": f"best achievable ({best}); regression reported to the district",
                },
            )
            r.raise_for_status()
            d = _settle(portal, rid)
    verified = _verify_certificate(portal, admin, rid, cli, d["status"])
    table = Table(title=f"esl-100: district A withdrawn ({d['status']})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "shards retrained", f"{len(un.get('affected_shards', []))}/{un.get('total_shards')}"
    )
    base = forgetting.get("baseline", {})
    cand = forgetting.get("candidate", {})
    ref = forgetting.get("reference", {})
    table.add_row("attack AUC on district A, before unlearning", _f(base.get("auc")))
    table.add_row("attack AUC on district A, after", _f(cand.get("auc")))
    table.add_row("attack AUC, out-reference models", _f(ref.get("auc")))
    table.add_row(
        "TPR at 1% FPR before / after",
        f"{_f(base.get('tpr_at_1pct_fpr'))} / {_f(cand.get('tpr_at_1pct_fpr'))}",
    )
    check = first["checks"].get("forgetting", {})
    power = forgetting.get("power") or {}
    table.add_row(
        "forgetting check: verdict (power on the baseline)",
        f"{check.get('status', '-')} ({'has power' if power.get('has_power') else 'no power'})",
    )
    attacks = forgetting.get("attacks") or {}
    for name in ("lira_offline", "lira_online", "rmia"):
        b2 = (attacks.get("baseline") or {}).get(name) or {}
        a2 = (attacks.get("candidate") or {}).get(name) or {}
        table.add_row(
            f"{name} AUC before / after (TPR at 0.1% FPR)",
            f"{_f(b2.get('auc'))} / {_f(a2.get('auc'))} "
            f"({_f(b2.get('tpr_at_0.1pct_fpr'))} / {_f(a2.get('tpr_at_0.1pct_fpr'))})",
        )
    b, a = _group_rows(fair, LANGUAGE)
    table.add_row(
        f"accuracy of {LANGUAGE} speakers before -> after unlearning", f"{_f(b)} -> {_f(a)}"
    )
    named: dict[str, list[str]] = {}
    for f in flagged:
        named.setdefault(f"{f['column']}={f['group']}", []).append(str(f["metric"]))
    table.add_row(
        "flagged groups", "; ".join(f"{g} ({', '.join(m)})" for g, m in named.items()) or "none"
    )
    for kind, rep in tried.items():
        f2 = rep.get("checks", {}).get("fairness", {})
        acc = (rep.get("checks", {}).get("utility", {}).get("metrics") or {}).get(
            "candidate_accuracy"
        )
        table.add_row(
            f"mitigation {kind}: {LANGUAGE} accuracy / overall / fairness",
            f"{_f(_group_rows(f2, LANGUAGE)[1])} / {_f(acc)} / {f2.get('status', '-')}",
        )
        still = [
            f"{f['group']} {f['metric']} {_f(f['before'])}->{_f(f['after'])}"
            for f in (f2.get("metrics") or {}).get("flagged", [])
        ]
        table.add_row(f"  flagged after {kind}", "; ".join(still) or "none")
    table.add_row("certificate verifies offline", verified)
    return table


def _f(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "-"


def _verify_certificate(
    portal: httpx.Client, admin: httpx.Client, rid: str, cli: list[str], status: str
) -> str:
    if status != "completed":
        return "no (request not completed)"
    r = portal.get(f"/v1/deletion-requests/{rid}/certificate")
    if r.status_code != 200:
        return f"no certificate ({r.status_code})"
    key = _get(admin, "/v1/signing-key")
    with tempfile.TemporaryDirectory() as tmp:
        cert, pub = Path(tmp) / "certificate.json", Path(tmp) / "key.pem"
        cert.write_text(r.text)
        pub.write_text(key["public_key_pem"])
        out = subprocess.run(
            [*cli, "verify-certificate", str(cert), "--public-key", str(pub)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return "yes" if out.returncode == 0 else f"NO: {out.stdout.strip()} {out.stderr.strip()}"
