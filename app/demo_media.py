"""The seed stories in their own modalities (issue 12), for `palimpsest demo`.

- CV text: free-text CVs, some of which mention a driving licence, rank candidates; the
  firm forgets the licence words (a feature request with `tokens`): every CV scores the
  same with or without them afterwards, and the gap between licence holders and others
  is shown before and after.
- ESL speech: students' spoken answers, synthesised offline with espeak-ng in the voice
  of their home language (the accent); district A, which holds most speakers of one
  language, withdraws; the fairness check looks at that accent group and the
  group-reweighted mitigation is run when it is flagged.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

TERMINAL = {"completed", "failed", "needs_review", "cancelled", "rejected"}
LICENCE = ["driving", "licence"]

# -- CV text ---------------------------------------------------------------------------

SKILLS = {
    "strong": ["python", "sql", "forecasting", "negotiation", "leadership", "budgeting"],
    "weak": ["filing", "typing", "photocopying", "scheduling"],
}
PHRASES = [
    "experienced professional with {y} years in {a} and {b}",
    "{y} years of work in {a}; trained in {b}",
    "team player, {y} years, skilled in {a} and {b}",
]
LICENCE_PHRASES = [
    "holds a full driving licence",
    "Driving licence: yes",
    "clean driving licence, own car",
]


def cv_text_rows(n: int = 2400, seed: int = 12) -> list[dict[str, Any]]:
    """Historical hiring decisions that rewarded a driving licence."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        years = int(rng.integers(0, 15))
        merit = float(rng.normal())
        pool = SKILLS["strong"] if merit > 0 else SKILLS["weak"]
        a, b = rng.choice(pool, size=2, replace=False)
        text = str(rng.choice(PHRASES)).format(y=years, a=a, b=b)
        licence = bool(rng.random() < 0.55)
        if licence:
            text += ". " + str(rng.choice(LICENCE_PHRASES))
        hired = int(1.3 * merit + 0.08 * (years - 6) + (1.0 if licence else -0.5) > 0.2)
        rows.append(
            {
                "candidate": f"c{i:05d}",
                "agency": f"agency-{i % 3}",
                "cv": text + ".",
                "region": str(rng.choice(["urban", "rural"], p=[0.7, 0.3])),
                "licence": "yes" if licence else "no",
                "hired": hired,
            }
        )
    return rows


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), buf)
    return buf.getvalue()


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


def _train(admin: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = admin.post("/v1/models", json=body)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    while (job := _get(admin, f"/v1/jobs/{job_id}"))["status"] not in ("succeeded", "failed"):
        time.sleep(0.3)
    if job["status"] != "succeeded":
        raise RuntimeError(f"training {body['name']} failed: {job.get('error')}")
    return _get(admin, f"/v1/models/{body['name']}")


def _strip(text: str) -> str:
    return re.sub(r"\b(?:driving|licence)\b", " ", text, flags=re.IGNORECASE)


def _licence_effect(
    admin: httpx.Client, model: str, people: list[dict[str, Any]]
) -> dict[str, float]:
    """Score change when only the licence words are removed from each CV, and the gap
    between candidates whose CV mentions a licence and the others."""

    def scores(texts: list[str]) -> np.ndarray:
        records = [{"cv": t, "region": p["region"]} for t, p in zip(texts, people, strict=True)]
        r = admin.post(f"/v1/models/{model}/predict", json={"records": records})
        r.raise_for_status()
        return np.asarray([p["score"] for p in r.json()["predictions"]])

    own = scores([p["cv"] for p in people])
    moved = np.abs(scores([_strip(p["cv"]) for p in people]) - own)
    has = np.asarray([p["licence"] == "yes" for p in people])
    return {
        "max_change": float(moved.max()),
        "mean_change": float(moved.mean()),
        "gap": float(own[has].mean() - own[~has].mean()),
    }


def cv_text_story(admin: httpx.Client, console: Console) -> Table:
    console.rule("Story 1b: the CV ranker reads free text; it forgets the licence words")
    rows = cv_text_rows(n=1500)
    spec = {
        "name": "cv-texts",
        "subject_column": "candidate",
        "label_column": "hired",
        "source_column": "agency",
        "text_columns": ["cv"],
        "group_columns": ["licence"],
        "feature_columns": ["cv", "region"],
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("cvs.parquet", io.BytesIO(_parquet(rows)), "application/octet-stream")},
        data={"spec": json.dumps(spec)},
    )
    r.raise_for_status()
    ds = r.json()
    console.print(f"dataset: {ds['n_records']} free-text CVs, column kinds {ds['column_kinds']}")
    _train(
        admin,
        {
            "name": "cv-text-ranker",
            "dataset_id": ds["id"],
            "architecture": {
                "kind": "mlp",
                "hidden": [16],
                "encoders": {"cv": {"dim": 16, "buckets": 4096}},
            },
            "training": {"epochs": 5, "batch_size": 64, "lr": 0.02, "seed": 3},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "verification": {"utility_max_drop": 0.5},
        },
    )
    people = rows[::6][:300]
    before = _licence_effect(admin, "cv-text-ranker", people)
    r = admin.post(
        "/v1/deletion-requests",
        json={
            "kind": "feature",
            "model": "cv-text-ranker",
            "feature": "cv",
            "tokens": LICENCE,
            "reason": "the licence is no longer a job requirement",
        },
    )
    r.raise_for_status()
    rid = r.json()["id"]
    d = _settle(admin, rid)
    if d["status"] == "needs_review":
        note = "accuracy drop is the removed bias: the labels historically rewarded the licence"
        console.print(f"  admin review: approve ({note})")
        admin.post(
            f"/v1/deletion-requests/{rid}/review", json={"action": "approve", "note": note}
        ).raise_for_status()
        d = _settle(admin, rid)
    (m,) = d["models"]
    report = _get(admin, f"/v1/reports/{m['report_id']}") if m.get("report_id") else {}
    check = report.get("checks", {}).get("feature", {})
    after = _licence_effect(admin, "cv-text-ranker", people)
    versions = {v["version"]: v for v in _get(admin, "/v1/models/cv-text-ranker")["versions"]}
    acc = [
        versions.get(v, {}).get("metrics", {}).get("test_accuracy")
        for v in (m["from_version"], m["to_version"])
    ]
    table = Table(
        title=f"cv-text-ranker: forgetting the words {LICENCE} ({d['status']}, {m['method']})"
    )
    for col in (
        "",
        "version",
        "max score change, words removed",
        "mean change",
        "score gap licence vs none",
        "test accuracy",
    ):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(
        "before",
        f"v{m['from_version']}",
        _f(before["max_change"]),
        _f(before["mean_change"]),
        _f(before["gap"]),
        _f(acc[0]),
    )
    table.add_row(
        "after",
        f"v{m['to_version']}",
        _f(after["max_change"]),
        _f(after["mean_change"]),
        _f(after["gap"]),
        _f(acc[1]),
    )
    flip = check.get("metrics", {}).get("after", {}).get("max_abs_change")
    table.add_row("feature check", "", _f(flip), "", "", "pass" if check.get("passed") else "-")
    return table


# -- ESL speech -------------------------------------------------------------------------

DISTRICT_A = "district-a"
ACCENT = "vi"  # the home language nearly all of whose speakers study in district A
VOICES = {"en": "en-us", "es": "es", "pl": "pl", ACCENT: "vi"}
# The answers the tool recognises (the label): English numbers, colours and things,
# each spelled
# as a speaker of the home language says it, in that language's own spelling, so that
# its espeak-ng voice reads it with the language's phonology: Spanish /θ/ for "th" and
# /b/ for "v", Polish /f/ for "th" and /w/ for "v", Vietnamese aspirated t, final
# consonants dropped, tones and a vowel between the consonants of a cluster ("bờ lu").
ANSWERS: dict[str, dict[str, str]] = {
    "en": {
        "one": "one", "two": "two", "three": "three", "four": "four", "five": "five",
        "six": "six", "seven": "seven", "eight": "eight", "nine": "nine", "ten": "ten",
        "red": "red", "blue": "blue", "green": "green", "black": "black",
        "white": "white", "brown": "brown",
        "cat": "cat", "dog": "dog", "fish": "fish", "bird": "bird", "house": "house",
        "book": "book", "car": "car", "tree": "tree",
    },
    "es": {
        "one": "guan", "two": "tu", "three": "zri", "four": "for", "five": "faif",
        "six": "sics", "seven": "seben", "eight": "eit", "nine": "nain", "ten": "ten",
        "red": "red", "blue": "blu", "green": "grin", "black": "blak",
        "white": "guait", "brown": "braun",
        "cat": "quet", "dog": "dog", "fish": "fis", "bird": "berd", "house": "jaus",
        "book": "buk", "car": "car", "tree": "tri",
    },
    "pl": {
        "one": "łan", "two": "tu", "three": "fri", "four": "for", "five": "fajw",
        "six": "syks", "seven": "sewen", "eight": "ejt", "nine": "najn", "ten": "ten",
        "red": "red", "blue": "blu", "green": "grin", "black": "blek",
        "white": "łajt", "brown": "brałn",
        "cat": "ket", "dog": "dog", "fish": "fisz", "bird": "berd", "house": "hałs",
        "book": "buk", "car": "kar", "tree": "czri",
    },
    ACCENT: {
        "one": "oan", "two": "tu", "three": "thri", "four": "pho", "five": "phai",
        "six": "xích", "seven": "xe vần", "eight": "ây", "nine": "nai", "ten": "then",
        "red": "rét", "blue": "bờ lu", "green": "gờ rin", "black": "bờ léc",
        "white": "oai", "brown": "bờ rao",
        "cat": "khét", "dog": "đóc", "fish": "phít", "bird": "bơ", "house": "hao",
        "book": "búc", "car": "kha", "tree": "chi",
    },
}  # fmt: skip
WORDS = list(ANSWERS["en"])
# Each home language's speakers in the class speak in their own range of speed (words
# per minute) and pitch (espeak-ng's 0-99); each student has one of espeak-ng's voice
# variants and varies a little from answer to answer.
SPEED = {"en": (150, 185), "es": (165, 200), "pl": (140, 175), ACCENT: (115, 145)}
PITCH = {"en": (35, 55), "es": (45, 65), "pl": (30, 50), ACCENT: (60, 85)}
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4"]
ANSWERS_PER_STUDENT = 8


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, speed: int, pitch: int) -> bytes:
    """A 16-bit PCM WAV of `text`, synthesised offline by espeak-ng."""
    out = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return out.stdout


def esl_speech_rows(n_students: int = 240, seed: int = 31) -> list[dict[str, Any]]:
    """Students saying answers aloud in the accent of their home language; the label is
    the answer said (`word`, one of `WORDS`), what the tool must recognise.

    District A (45% of the students) holds nearly all `vi` speakers: each of its
    students speaks `vi` at home with probability 0.9, each other student with 0.06
    (with the defaults: 99 `vi` speakers in A and 12 elsewhere, 89% in A). Each student
    says `ANSWERS_PER_STUDENT` different answers drawn at random from the 24, once each,
    so the few `vi` speakers outside A say each answer only a handful of times: what the
    model knows of the `vi` accent it learns from district A. Deterministic for a seed
    (espeak-ng is)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    calls: list[tuple[str, str, int, int]] = []
    for s in range(n_students):
        if s < n_students * 9 // 20:
            district = DISTRICT_A
            lang = ACCENT if rng.random() < 0.9 else str(rng.choice(["en", "es", "pl"]))
        else:
            district = f"district-{'bcde'[s % 4]}"
            lang = str(rng.choice(list(VOICES), p=[0.44, 0.25, 0.25, 0.06]))
        speed, pitch = int(rng.integers(*SPEED[lang])), int(rng.integers(*PITCH[lang]))
        voice = f"{VOICES[lang]}+{rng.choice(VARIANTS)}"
        chosen = rng.choice(WORDS, size=ANSWERS_PER_STUDENT, replace=False)
        for j, word in enumerate(str(w) for w in chosen):
            rows.append(
                {
                    "student": f"st{s:04d}",
                    "district": district,
                    "home_language": lang,
                    "answer": f"audio/st{s:04d}-{j}.wav",
                    "word": word,
                }
            )
            jitter = int(rng.integers(-8, 9)), int(rng.integers(-5, 6))
            calls.append((ANSWERS[lang][word], voice, speed + jitter[0], pitch + jitter[1]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        for row, wav in zip(rows, pool.map(lambda c: speak(*c), calls), strict=True):
            row["wav"] = wav
    return rows


def speech_zip(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        lines = ["student,district,home_language,answer,word"]
        for r in rows:
            zf.writestr(r["answer"], r["wav"])
            lines.append(
                f"{r['student']},{r['district']},{r['home_language']},{r['answer']},{r['word']}"
            )
        zf.writestr("manifest.csv", "\n".join(lines) + "\n")
    return buf.getvalue()


SPEECH_SPEC: dict[str, Any] = {
    "name": "esl-speech",
    "subject_column": "student",
    "label_column": "word",
    "source_column": "district",
    "audio_columns": ["answer"],
    "group_columns": ["home_language"],
    "feature_columns": ["answer"],
}


def speech_model(dataset_id: str) -> dict[str, Any]:
    """The story's `POST /v1/models` body for the uploaded answers."""
    return {
        "name": "esl-speech",
        "dataset_id": dataset_id,
        "architecture": {
            "kind": "mlp",
            "hidden": [32],
            "encoders": {"answer": {"seconds": 1.2, "n_mels": 24, "width": 8}},
        },
        "training": {"epochs": 50, "batch_size": 32, "lr": 0.01, "seed": 7},
        # District A (45% of the answers) fills one of the two shards alone, so the
        # withdrawal retrains that shard and the other serves unchanged.
        "unlearning": {"mode": "sisa", "shards": 2, "slices": 2, "sharding": "source"},
        "group_columns": ["home_language"],
        # Half the answers are held out, so that about 50 `vi` answers outside district
        # A remain to judge the accent group by once A's rows are erased.
        "test_fraction": 0.5,
        "verification": {"min_group_size": 10, "utility_max_drop": 0.5},
    }


def _group(check: dict[str, Any], group: str) -> tuple[float | None, float | None]:
    m = check.get("metrics", {})
    before = next((g for g in m.get("before", []) if g["group"] == group), None)
    after = next((g for g in m.get("after", []) if g["group"] == group), None)
    return (before or {}).get("accuracy"), (after or {}).get("accuracy")


def esl_speech_story(
    admin: httpx.Client, portal: httpx.Client, console: Console, cli: list[str]
) -> Table:
    console.rule("Story 2b: the ESL tool hears spoken answers; district A withdraws")
    if not espeak_available():
        table = Table(title="esl-speech: skipped")
        table.add_column("reason")
        table.add_row("espeak-ng is not installed (apt-get install espeak-ng)")
        return table
    t0 = time.perf_counter()
    rows = esl_speech_rows()
    console.print(
        f"synthesised {len(rows)} spoken answers with espeak-ng in {time.perf_counter() - t0:.1f} s"
    )
    r = admin.post(
        "/v1/datasets",
        files={"file": ("answers.zip", io.BytesIO(speech_zip(rows)), "application/zip")},
        data={"spec": json.dumps(SPEECH_SPEC)},
    )
    r.raise_for_status()
    ds = r.json()
    console.print(f"dataset: {ds['n_records']} recordings, column kinds {ds['column_kinds']}")
    _train(admin, speech_model(ds["id"]))
    r = portal.post(
        "/v1/deletion-requests",
        json={"kind": "source", "source": DISTRICT_A, "reason": "district withdrew"},
    )
    r.raise_for_status()
    rid = r.json()["id"]
    d = _settle(portal, rid)
    (m,) = d["models"]
    first = _get(admin, f"/v1/reports/{m['report_id']}")
    fair = first["checks"].get("fairness", {})
    flagged = fair.get("metrics", {}).get("flagged", [])
    for f in flagged:
        console.print(
            f"  [red]flagged[/red] {f['column']}={f['group']}: {f['metric']} "
            f"{f['before']:.3f} -> {f['after']:.3f} (n={f['n']})"
        )
    mitigated: dict[str, Any] = {}
    if d["status"] == "needs_review":
        console.print("  admin review: mitigate (group-reweighted retraining)")
        admin.post(
            f"/v1/deletion-requests/{rid}/review",
            json={"action": "mitigate", "note": "upweight the flagged accent group"},
        ).raise_for_status()
        d = _settle(portal, rid)
        (m2,) = d["models"]
        if m2.get("report_id"):
            mitigated = _get(admin, f"/v1/reports/{m2['report_id']}")
        if d["status"] == "needs_review":
            console.print("  the mitigation did not clear the check; admin approves with a note")
            admin.post(
                f"/v1/deletion-requests/{rid}/review",
                json={"action": "approve", "note": "regression reported to the coordinator"},
            ).raise_for_status()
            d = _settle(portal, rid)
    from app.demo_district import _verify_certificate

    verified = _verify_certificate(portal, admin, rid, cli, d["status"])
    table = Table(title=f"esl-speech: district A withdrawn ({d['status']})")
    table.add_column("")
    table.add_column("value", justify="right")
    job = _get(admin, f"/v1/jobs/{m['job_id']}")
    un = job["result"].get("unlearning", {})
    table.add_row(
        "shards retrained", f"{len(un.get('affected_shards', []))}/{un.get('total_shards')}"
    )
    named = sorted({f"{f['column']}={f['group']} ({f['metric']})" for f in flagged})
    table.add_row("flagged groups", "; ".join(named) or "none")
    after_mitigation = mitigated.get("checks", {}).get("fairness", {})
    sizes = {g["group"]: g["n"] for g in fair.get("metrics", {}).get("before", [])}
    for lang in VOICES:
        b, a = _group(fair, lang)
        am = _group(after_mitigation, lang)[1] if mitigated else None
        table.add_row(
            f"accuracy, {lang}-accented answers (n={sizes.get(lang, 0)}): "
            "before / after withdrawal / after mitigation",
            f"{_f(b)} / {_f(a)} / {_f(am)}",
        )
    if not flagged:
        table.add_row("mitigation", "not run: no group flagged (drop not significant)")
    table.add_row("certificate verifies offline", verified)
    return table


def _f(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "-"
