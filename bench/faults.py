"""Fault injection: kill workers and APIs mid-flight, take S3 and PostgreSQL down, fill the disk.

``python -m bench faults [--trials 20] [--only NAME ...]`` runs every scenario below against a
real PostgreSQL + S3 (moto's server, standing in for MinIO) deployment with ``slim serve`` and
``slim worker`` as child processes, and writes ``bench/results/faults.{json,md}``: per fault,
the trials, the successes and anything lost. ``tests/faults`` runs the same scenarios with a
few trials and shorter outages.

Scenarios (each trial checks the invariant named):

``worker_kill``        SIGKILL a worker at a random moment of a compression; another worker
                       takes the job over once the lease expires. The checkpoint appears once,
                       complete (every file pulls back with its recorded sha256).
``api_kill_upload``    SIGKILL the API while a weight file streams in. No file row, no
                       checkpoint from the partial upload (its commit is refused and the
                       push is ``failed``); garbage collection then leaves no
                       temporary object, no open multipart upload and no unreferenced blob —
                       and every blob a row points at is still there.
``api_kill_download``  SIGKILL the API mid-download; after a restart the download resumes
                       with ``Range``/``If-Range`` and the joined file has the recorded sha256.
``gc_during_uploads``  garbage collection (short grace) runs in a tight loop while checkpoints
                       are uploaded slowly, compressed, pulled and deleted: it never removes a
                       blob a committed row points to.
``s3_outage``          the S3 endpoint stops for ``--outage-seconds`` while a job runs (the API
                       answers 503 meanwhile); bounded retries with backoff, then the job either
                       succeeds or fails with ``storage_unavailable`` and succeeds when
                       committed again. Never a corrupt delta (``scrub`` at the end).
``pg_restart``         PostgreSQL stops for a few seconds under read/write load: only 2xx and
                       503 answers, recovery without intervention, no acknowledged row or
                       queued job lost.
``disk_full``          the local blob store's filesystem (a small tmpfs or loop-mounted ext4)
                       is full: an upload gets 507 ``storage_full`` and a job fails with
                       ``storage_full`` (retryable) — nothing half-written is visible, and both
                       succeed once space is freed.

PostgreSQL is shared with other users of the machine: ``pg_restart`` always starts it again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from bench.harness import (
    Api,
    CannotMount,
    Deployment,
    Moto,
    Proc,
    client,
    commit,
    free_bytes,
    make_base,
    make_checkpoint,
    pg_always_back,
    pg_ctl,
    pg_ready,
    pull_sha256,
    push_dir,
    small_filesystem,
    synthetic_pair,
    wait_job,
    wait_until,
    worker,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    """Knobs of one run (the benchmark's defaults; the CI tests shrink them)."""

    trials: int = 20
    outage_seconds: float = 30.0
    worker_s3_retry_seconds: float = 20.0
    api_s3_retry_seconds: float = 5.0
    pg_down_seconds: float = 4.0
    model_params: int = 2 << 20
    kill_params: int = 4 << 20
    upload_params: int = 4 << 20
    gc_grace_seconds: float = 1.0
    seed: int = 0


@dataclass
class Trial:
    ok: bool
    lost: int = 0
    seconds: float = 0.0
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """One scenario's trials."""

    name: str
    trials: list[Trial] = field(default_factory=list)
    setup_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        secs = [t.seconds for t in self.trials]
        failures = [t.note for t in self.trials if not t.ok]
        return {
            "scenario": self.name,
            "trials": len(self.trials),
            "successes": sum(t.ok for t in self.trials),
            "lost": sum(t.lost for t in self.trials),
            "median_trial_seconds": round(statistics.median(secs), 2) if secs else None,
            "setup_seconds": round(self.setup_seconds, 1),
            "failures": failures[:10],
            "notes": self.notes,
            "skipped": self.skipped,
        }


Log = Callable[[str], None]


def _run_trials(out: Outcome, cfg: Config, log: Log, body: Callable[[int], Trial]) -> Outcome:
    for i in range(cfg.trials):
        t0 = time.monotonic()
        try:
            trial = body(i)
        except Exception as exc:  # a broken trial is a failed trial, with the reason
            trial = Trial(False, note=f"{type(exc).__name__}: {exc}"[:500])
            log(traceback.format_exc())
        trial.seconds = time.monotonic() - t0
        out.trials.append(trial)
        log(
            f"  {out.name} #{i + 1}: {'ok' if trial.ok else 'FAILED'} "
            f"({trial.seconds:.1f}s){' lost=' + str(trial.lost) if trial.lost else ''} {trial.note}"
        )
    return out


# -- shared checks ---------------------------------------------------------------------------------


def pull_checkpoint(c: httpx.Client, checkpoint_id: str) -> tuple[bool, str]:
    """Pull every file of a checkpoint; each must hash to its ETag (the recorded sha256)."""
    files = c.get(f"/v1/checkpoints/{checkpoint_id}/files").json()["data"]
    if not files:
        return False, "no files"
    for f in files:
        sha, etag, n = pull_sha256(c, f"/v1/checkpoints/{checkpoint_id}/files/{f['path']}")
        if etag is None or sha != etag or n != f["size"]:
            return False, f"{f['path']}: sha {sha[:12]} vs etag {str(etag)[:12]}, {n} bytes"
    return True, ""


def referenced_missing(rt: Any) -> list[str]:
    """Blob keys that a row points at but the store does not hold."""
    from storage.models import Checkpoint, File

    with rt.sessions() as session:
        keys = set(session.scalars(select(File.blob_key).where(File.blob_key.is_not(None))))
        keys |= set(
            session.scalars(
                select(Checkpoint.delta_blob_key).where(Checkpoint.delta_blob_key.is_not(None))
            )
        )
    return sorted(str(k) for k in keys if rt.store.head(str(k)) is None)


def unreferenced_objects(rt: Any) -> list[str]:
    from storage.repo import referenced_blob_keys

    keys = [e.key for e in rt.store.list_keys("")]
    with rt.sessions() as session:
        used = referenced_blob_keys(session, among=keys) if keys else set()
    return [k for k in keys if k not in used]


def open_multipart_uploads(rt: Any) -> int:
    store = rt.store
    if not hasattr(store, "_client"):  # the local store has no multipart uploads
        return 0
    page = store._client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return len(page.get("Uploads", []))


def gc_now(rt: Any, grace: float = 0.0) -> Any:
    from storage.gc import collect_garbage

    return collect_garbage(rt.sessions, rt.store, grace)


# -- scenarios -------------------------------------------------------------------------------------


def worker_kill(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("worker_kill")
    rng = random.Random(cfg.seed)
    t0 = time.monotonic()
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto)
    api = Api(dep).start()
    rt = dep.runtime()
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.kill_params)
        api.wait_ready()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
            # How long a fresh worker takes from claim to done: kills land inside that window.
            probe = make_checkpoint(c, base["id"], ft_dir, "probe", keep=0.05)
            probe_job = commit(c, probe["id"])["id"]
            w = worker(dep, "probe").start()
            try:
                wait_until(lambda: _claimed_by(rt, probe_job, "probe"), 120, "probe not claimed")
                claimed = time.monotonic()
                wait_job(c, probe_job)
                job_seconds = time.monotonic() - claimed
            finally:
                w.stop()
            out.notes.append(f"a job takes {job_seconds:.1f}s from claim to done")
            out.setup_seconds = time.monotonic() - t0

            def trial(i: int) -> Trial:
                from storage.models import Job

                ckpt = make_checkpoint(c, base["id"], ft_dir, f"wk-{i}", keep=0.05)
                job_id = commit(c, ckpt["id"])["id"]
                doomed = worker(dep, f"doomed-{i}").start()
                survivor: Proc | None = None
                try:
                    wait_until(
                        lambda: _claimed_by(rt, job_id, f"doomed-{i}"),
                        120,
                        "the doomed worker never claimed the job",
                    )
                    time.sleep(rng.uniform(0.0, 0.9 * job_seconds))
                    with rt.sessions() as s:
                        row = s.get(Job, job_id)
                        assert row is not None
                        mid_job = row.state.value == "running"
                        phase = (row.progress or {}).get("phase", "claimed")
                    doomed.kill()
                    survivor = worker(dep, f"survivor-{i}").start()
                    done = wait_job(c, job_id, timeout=300)
                finally:
                    doomed.kill()
                    if survivor is not None:
                        survivor.stop()
                info = {"mid_job": mid_job, "phase_at_kill": phase, "attempts": done["attempts"]}
                listing = c.get("/v1/checkpoints?state=ready&limit=1000").json()["data"]
                appearances = sum(1 for x in listing if x["name"] == f"wk-{i}")
                jobs = c.get(f"/v1/jobs?checkpoint_id={ckpt['id']}").json()["count"]
                pulled, why = pull_checkpoint(c, ckpt["id"])
                ok = (
                    done["state"] == "succeeded"
                    and appearances == 1
                    and jobs == 1
                    and pulled
                    and (done["attempts"] == 2 if mid_job else True)
                )
                note = "" if ok else f"state={done['state']} seen={appearances} jobs={jobs} {why}"
                return Trial(ok, lost=0 if pulled else 1, note=note, info=info)

            _run_trials(out, cfg, log, trial)
            mid = sum(1 for t in out.trials if t.info.get("mid_job"))
            phases = Counter(t.info.get("phase_at_kill") for t in out.trials)
            out.notes.append(f"{mid} of {len(out.trials)} kills hit a running job ({dict(phases)})")
            report = gc_now(rt)
            ready = c.get("/v1/checkpoints?state=ready&limit=1000").json()["data"]
            still = sum(pull_checkpoint(c, x["id"])[0] for x in ready)
            out.notes.append(
                f"gc afterwards removed {report.deleted_blobs} orphan blobs; "
                f"{still}/{len(ready)} checkpoints still pull back intact"
            )
            if still != len(ready) and out.trials:
                out.trials[-1].lost += len(ready) - still
    finally:
        api.stop()
        rt.close()
        moto.stop()
        dep.close()
    return out


def _claimed_by(rt: Any, job_id: str, owner: str) -> bool:
    from storage.models import Job

    with rt.sessions() as s:
        row = s.get(Job, job_id)
        return row is not None and row.lease_owner == owner


def api_kill_upload(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("api_kill_upload")
    rng = random.Random(cfg.seed + 1)
    t0 = time.monotonic()
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto)
    api = Api(dep).start()
    rt = dep.runtime()
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.upload_params)
        weights = ft_dir / "model.safetensors"
        size = weights.stat().st_size
        api.wait_ready()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
        out.setup_seconds = time.monotonic() - t0

        def trial(i: int) -> Trial:
            with client(api.url) as c:
                ckpt = make_checkpoint(c, base["id"], None, f"up-{i}", keep=0.05)
                cut = int(rng.uniform(0.05, 0.95) * size)

                def body() -> Any:
                    sent = 0
                    with weights.open("rb") as f:
                        while chunk := f.read(256 << 10):
                            if sent >= cut and api.alive:
                                api.kill()
                            sent += len(chunk)
                            yield chunk

                with contextlib.suppress(httpx.TransportError):
                    c.put(
                        f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors",
                        content=body(),
                        headers={"content-length": str(size)},
                    )
            api.start().wait_ready()
            with client(api.url) as c:
                files = c.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["count"]
                r = c.post(f"/v1/checkpoints/{ckpt['id']}/commit")
                refused = r.status_code == 400 and r.json()["code"] == "no_weights"
                state = c.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"]
                open_before = open_multipart_uploads(rt)
                gc = gc_now(rt)
                leftovers = unreferenced_objects(rt)
                open_after = open_multipart_uploads(rt)
                missing = referenced_missing(rt)
                # and the same file, sent whole, is taken
                push_dir(c, "checkpoints", ckpt["id"], ft_dir)
                whole = c.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["count"] == 3
            ok = (
                files == 0
                and refused
                and state == "failed"  # a refused commit fails the push and frees its name
                and not leftovers
                and open_after == 0
                and not missing
                and whole
            )
            info = {
                "cut_at": cut,
                "gc_deleted": gc.deleted_blobs,
                "gc_aborted_uploads": gc.aborted_uploads,
                "multipart_open_before_gc": open_before,
            }
            note = (
                ""
                if ok
                else f"files={files} refused={refused} state={state} leftovers={leftovers[:3]} "
                f"open={open_after} missing={missing[:3]} whole={whole}"
            )
            return Trial(ok, lost=len(missing), note=note, info=info)

        _run_trials(out, cfg, log, trial)
        aborted = sum(t.info.get("gc_aborted_uploads", 0) for t in out.trials)
        deleted = sum(t.info.get("gc_deleted", 0) for t in out.trials)
        out.notes.append(
            f"gc aborted {aborted} open multipart uploads and deleted {deleted} temporary or "
            "orphan objects left by the killed uploads"
        )
    finally:
        api.stop()
        rt.close()
        moto.stop()
        dep.close()
    return out


def api_kill_download(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("api_kill_download")
    rng = random.Random(cfg.seed + 2)
    t0 = time.monotonic()
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto)
    api = Api(dep).start()
    rt = dep.runtime()
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.upload_params)
        api.wait_ready()
        w = worker(dep, "worker").start()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
            ckpt = make_checkpoint(c, base["id"], ft_dir, "dl", keep=0.05)
            done = wait_job(c, commit(c, ckpt["id"])["id"])
            assert done["state"] == "succeeded", done
        w.stop()
        url = f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors"
        out.setup_seconds = time.monotonic() - t0

        def trial(i: int) -> Trial:
            import hashlib

            got = bytearray()
            etag = None
            with client(api.url) as c:
                size = int(c.head(url).headers["content-length"])
                cut = int(rng.uniform(0.05, 0.8) * size)
                with contextlib.suppress(httpx.TransportError), c.stream("GET", url) as r:
                    etag = r.headers["etag"]
                    for chunk in r.iter_bytes():
                        got += chunk
                        if len(got) >= cut and api.alive:
                            api.kill()
            killed_at = len(got)
            api.start().wait_ready()
            with client(api.url) as c:
                if killed_at < size:
                    r = c.get(url, headers={"Range": f"bytes={killed_at}-", "If-Range": str(etag)})
                    resumed = r.status_code == 206
                    got += r.content
                else:  # every byte had arrived before the connection dropped
                    resumed = True
                state = c.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"]
            sha = hashlib.sha256(got).hexdigest()
            ok = resumed and state == "ready" and f'"{sha}"' == etag and len(got) == size
            note = "" if ok else f"resumed={resumed} state={state} bytes={len(got)}/{size}"
            return Trial(ok, note=note, info={"killed_at": killed_at, "size": size})

        _run_trials(out, cfg, log, trial)
        missing = referenced_missing(rt)
        out.notes.append(f"after the kills: {len(missing)} referenced blobs missing")
        if missing and out.trials:
            out.trials[-1].lost += len(missing)
    finally:
        api.stop()
        rt.close()
        moto.stop()
        dep.close()
    return out


def gc_during_uploads(root: Path, cfg: Config, log: Log) -> Outcome:
    """On the local store (whose dedup refreshes timestamps on every hit, so a short grace is
    valid; S3 needs a grace above its dedup refresh period, see storage.gc)."""
    out = Outcome("gc_during_uploads")
    t0 = time.monotonic()
    dep = Deployment.create(root, s3=None)
    api = Api(dep).start()
    w = worker(dep, "worker").start()
    rt = dep.runtime()
    stop = threading.Event()
    swept = Counter[str]()
    violations: list[str] = []

    def sweep() -> None:
        while not stop.is_set():
            try:
                report = gc_now(rt, cfg.gc_grace_seconds)
                swept["rounds"] += 1
                swept["deleted"] += report.deleted_blobs
                missing = referenced_missing(rt)
                if missing:
                    violations.extend(missing)
            except Exception as exc:  # keep sweeping; a failure is recorded
                swept[f"error {type(exc).__name__}"] += 1
            stop.wait(0.05)

    gc_thread = threading.Thread(target=sweep, daemon=True)
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.model_params)
        api.wait_ready()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
            out.setup_seconds = time.monotonic() - t0
            gc_thread.start()
            made: list[str] = []

            def trial(i: int) -> Trial:
                before = len(violations)
                ckpt = make_checkpoint(c, base["id"], None, f"gc-{i}", keep=0.05)
                for name in ("config.json", "vocab.txt"):
                    push_dir_one(c, ckpt["id"], ft_dir / name, name)
                weights = ft_dir / "model.safetensors"
                span = 3 * cfg.gc_grace_seconds

                def slow() -> Any:  # spread over three grace periods
                    size = weights.stat().st_size
                    step = max(size // 12, 1)
                    with weights.open("rb") as f:
                        while chunk := f.read(step):
                            yield chunk
                            time.sleep(span / 12)

                r = c.put(
                    f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors",
                    content=slow(),
                    headers={"content-length": str(weights.stat().st_size)},
                )
                r.raise_for_status()
                time.sleep(cfg.gc_grace_seconds * 1.5)  # the blobs are now older than the grace
                done = wait_job(c, commit(c, ckpt["id"])["id"])
                pulled, why = pull_checkpoint(c, ckpt["id"])
                made.append(ckpt["id"])
                if len(made) > 2:  # garbage for the sweeper: an old checkpoint's delta
                    c.delete(f"/v1/checkpoints/{made.pop(0)}").raise_for_status()
                lost = len(violations) - before
                ok = done["state"] == "succeeded" and pulled and lost == 0
                note = (
                    "" if ok else f"state={done['state']} {why} missing={violations[before:][:3]}"
                )
                return Trial(ok, lost=lost, note=note)

            _run_trials(out, cfg, log, trial)
    finally:
        stop.set()
        if gc_thread.is_alive():
            gc_thread.join(timeout=60)
        out.notes.append(
            f"{swept['rounds']} gc rounds (grace {cfg.gc_grace_seconds:g}s) deleted "
            f"{swept['deleted']} blobs while uploads were in flight; "
            f"errors: {sum(v for k, v in swept.items() if k.startswith('error'))}"
        )
        w.stop()
        api.stop()
        rt.close()
        dep.close()
    return out


def push_dir_one(c: httpx.Client, checkpoint_id: str, path: Path, rel: str) -> None:
    r = c.put(f"/v1/checkpoints/{checkpoint_id}/files/{rel}", content=path.read_bytes())
    r.raise_for_status()


def s3_outage(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("s3_outage")
    rng = random.Random(cfg.seed + 3)
    t0 = time.monotonic()
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto, job_max_attempts=3)
    api = Api(dep, s3_retry_seconds=cfg.api_s3_retry_seconds).start()
    w = worker(dep, "worker", s3_retry_seconds=cfg.worker_s3_retry_seconds).start()
    rt = dep.runtime()
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.model_params)
        api.wait_ready()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
        out.setup_seconds = time.monotonic() - t0
        base_file = f"/v1/bases/{base['id']}/files/model.safetensors"

        def trial(i: int) -> Trial:
            from storage.models import Job

            with client(api.url, timeout=300) as c:
                ckpt = make_checkpoint(c, base["id"], ft_dir, f"s3-{i}", keep=0.05)
                job_id = commit(c, ckpt["id"])["id"]

                def running() -> bool:
                    with rt.sessions() as s:
                        row = s.get(Job, job_id)
                        return row is not None and row.state.value == "running"

                wait_until(running, 120, "the job never started")
                time.sleep(rng.uniform(0.0, 0.5))
                moto.stop()
                down_at = time.monotonic()
                try:
                    ready = c.get("/readyz").status_code
                    probe = c.get(base_file)
                    probe_code = probe.json().get("code") if probe.status_code >= 400 else None
                    info = {"readyz": ready, "pull_during": probe.status_code, "code": probe_code}
                    time.sleep(max(0.0, cfg.outage_seconds - (time.monotonic() - down_at)))
                finally:
                    moto.start()
                done = wait_job(c, job_id, timeout=cfg.outage_seconds + 600)
                info |= {"state": done["state"], "attempts": done["attempts"]}
                retried = False
                if done["state"] == "failed":
                    code = (done.get("error") or {}).get("code")
                    info["error"] = code
                    if code != "storage_unavailable":
                        return Trial(False, note=f"failed with {code}", info=info)
                    done = wait_job(c, commit(c, ckpt["id"])["id"], timeout=600)
                    retried = True
                pulled, why = pull_checkpoint(c, ckpt["id"])
            ok = (
                done["state"] == "succeeded"
                and pulled
                and info["readyz"] == 503
                and info["pull_during"] == 503
            )
            info["recommitted"] = retried
            note = "" if ok else f"{info} {why}"
            return Trial(ok, lost=0 if pulled else 1, note=note, info=info)

        _run_trials(out, cfg, log, trial)
        from storage.scrub import scrub

        report = scrub(rt.sessions, rt.store)
        out.notes.append(
            f"outage {cfg.outage_seconds:g}s, worker S3 retry window "
            f"{cfg.worker_s3_retry_seconds:g}s, API {cfg.api_s3_retry_seconds:g}s; "
            f"{sum(t.info.get('recommitted', False) for t in out.trials)} jobs failed "
            f"(storage_unavailable) and succeeded when committed again; attempts used: "
            f"{dict(Counter(t.info.get('attempts') for t in out.trials))}; scrub afterwards: "
            f"{report.deltas_checked} deltas, {report.frames_checked} frames, "
            f"{len(report.problems)} problems"
        )
        if report.problems and out.trials:
            out.trials[-1].lost += len(report.problems)
    finally:
        moto.start()
        w.stop()
        api.stop()
        rt.close()
        moto.stop()
        dep.close()
    return out


def pg_restart(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("pg_restart")
    t0 = time.monotonic()
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto)
    api = Api(dep).start()
    w = worker(dep, "worker").start()
    try:
        base_dir, ft_dir = synthetic_pair(root / "models", params=cfg.model_params)
        api.wait_ready()
        with client(api.url) as c:
            base = make_base(c, base_dir, "base")
        out.setup_seconds = time.monotonic() - t0

        def trial(i: int) -> Trial:
            statuses: Counter[str] = Counter()
            acked: list[str] = []
            stop = threading.Event()

            def reader() -> None:
                with client(api.url, timeout=60) as c:
                    while not stop.is_set():
                        for url in ("/v1/checkpoints", f"/v1/bases/{base['id']}"):
                            try:
                                statuses[str(c.get(url).status_code)] += 1
                            except httpx.TransportError as exc:
                                statuses[type(exc).__name__] += 1
                        time.sleep(0.02)

            def writer() -> None:
                n = 0
                with client(api.url, timeout=60) as c:
                    while not stop.is_set():
                        n += 1
                        try:
                            r = c.post("/v1/bases", json={"name": f"pg-{i}-{n}"})
                            statuses[str(r.status_code)] += 1
                            if r.status_code == 201:
                                acked.append(r.json()["id"])
                        except httpx.TransportError as exc:
                            statuses[type(exc).__name__] += 1
                        time.sleep(0.05)

            with client(api.url, timeout=120) as c:
                ckpt = make_checkpoint(c, base["id"], ft_dir, f"pg-{i}", keep=0.05)
                job_id = commit(c, ckpt["id"])["id"]
                threads = [
                    threading.Thread(target=f, daemon=True) for f in (reader, reader, writer)
                ]
                for t in threads:
                    t.start()
                time.sleep(1.0)
                with pg_always_back():
                    pg_ctl("stop")
                    down = time.monotonic()
                    time.sleep(cfg.pg_down_seconds)
                    during = dict(statuses)
                    pg_ctl("start")
                    up = time.monotonic()
                wait_until(
                    lambda: _ready(c), 120, "the API did not recover after PostgreSQL came back"
                )
                recovered = time.monotonic() - up
                time.sleep(1.0)
                stop.set()
                for t in threads:
                    t.join(timeout=60)
                done = wait_job(c, job_id, timeout=600)
                missing = [b for b in acked if c.get(f"/v1/bases/{b}").status_code != 200]
                pulled, why = (
                    pull_checkpoint(c, ckpt["id"])
                    if done["state"] == "succeeded"
                    else (False, done["state"])
                )
            bad = {k: v for k, v in statuses.items() if k not in ("200", "201", "503")}
            info = {
                "statuses": dict(statuses),
                "during_outage": during,
                "down_seconds": round(up - down, 1),
                "recovered_seconds": round(recovered, 2),
                "acked_writes": len(acked),
            }
            ok = not bad and not missing and pulled and statuses["503"] > 0
            note = (
                "" if ok else f"bad={bad} missing={len(missing)} job={why} 503s={statuses['503']}"
            )
            lost = len(missing) + (0 if pulled else 1)
            return Trial(ok, lost=lost, note=note, info=info)

        _run_trials(out, cfg, log, trial)
        rec = [t.info.get("recovered_seconds", 0) for t in out.trials if t.info]
        answers = Counter[str]()
        for t in out.trials:
            answers.update(t.info.get("statuses", {}))
        out.notes.append(
            f"PostgreSQL down {cfg.pg_down_seconds:g}s per trial under 2 readers + 1 writer; "
            f"answers: {dict(answers)}; API ready again {max(rec, default=0):.2f}s (worst) after "
            f"PostgreSQL was; {sum(t.info.get('acked_writes', 0) for t in out.trials)} "
            "acknowledged writes, all found afterwards"
            if not any(t.lost for t in out.trials)
            else f"answers: {dict(answers)}"
        )
    finally:
        with pg_always_back():
            pass
        w.stop()
        api.stop()
        moto.stop()
        dep.close()
    return out


def _ready(c: httpx.Client) -> bool:
    try:
        return c.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def disk_full(root: Path, cfg: Config, log: Log) -> Outcome:
    out = Outcome("disk_full")
    rng = random.Random(cfg.seed + 4)
    t0 = time.monotonic()
    try:
        fs_ctx = small_filesystem(root / "smallfs", 24 << 20)
        fs = fs_ctx.__enter__()
    except CannotMount as exc:
        out.skipped = str(exc)
        return out
    try:
        dep = Deployment.create(root, s3=None, blob_dir=fs / "blobs", job_max_attempts=2)
        api = Api(dep).start()
        w = worker(dep, "worker").start()
        rt = dep.runtime()
        try:
            base_dir, ft_dir = synthetic_pair(root / "models", params=1 << 20)
            api.wait_ready()
            with client(api.url) as c:
                base = make_base(c, base_dir, "base")
            out.setup_seconds = time.monotonic() - t0
            filler = fs / "filler"

            def fill(leave: int) -> None:
                filler.unlink(missing_ok=True)
                room = free_bytes(fs) - leave
                if room > 0:
                    with filler.open("wb") as f:
                        f.truncate(0)
                        chunk = b"\0" * (1 << 20)
                        while room > 0:
                            n = min(room, len(chunk))
                            f.write(chunk[:n])
                            room -= n

            def trial(i: int) -> Trial:
                with client(api.url) as c:
                    ckpt = make_checkpoint(c, base["id"], ft_dir, f"df-{i}", keep=0.05)  # fits
                    other = make_checkpoint(c, base["id"], None, f"df-up-{i}", keep=0.05)
                    before = {e.key for e in rt.store.list_keys("sha256/")}
                    fill(rng.randint(0, 64 << 10))
                    weights = ft_dir / "model.safetensors"
                    r = c.put(
                        f"/v1/checkpoints/{other['id']}/files/model.safetensors",
                        content=weights.read_bytes(),
                    )
                    upload_code = r.json().get("code") if r.status_code != 200 else "stored"
                    job = wait_job(c, commit(c, ckpt["id"])["id"])
                    job_code = (job.get("error") or {}).get("code") or job["state"]
                    after = {e.key for e in rt.store.list_keys("sha256/")}
                    tmp_left = list(rt.store.list_keys("tmp/"))
                    visible = c.get(f"/v1/checkpoints/{other['id']}/files").json()["count"]
                    state = c.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"]
                    filler.unlink(missing_ok=True)
                    # with space again both go through
                    r2 = c.put(
                        f"/v1/checkpoints/{other['id']}/files/model.safetensors",
                        content=weights.read_bytes(),
                    )
                    again = job_code == "succeeded" or (
                        wait_job(c, commit(c, ckpt["id"])["id"])["state"] == "succeeded"
                    )
                    pulled, why = pull_checkpoint(c, ckpt["id"])
                clean = (
                    r.status_code == 507
                    and upload_code == "storage_full"
                    and visible == 0
                    and not tmp_left
                    and (after - before) <= {k for k in after if _is_delta(rt, k)}
                )
                job_ok = job_code in ("storage_full", "succeeded") and (
                    state == ("ready" if job_code == "succeeded" else "failed")
                )
                ok = clean and job_ok and r2.status_code == 200 and again and pulled
                info = {"upload": [r.status_code, upload_code], "job": job_code}
                note = (
                    ""
                    if ok
                    else f"{info} visible={visible} tmp={len(tmp_left)} state={state} {why}"
                )
                return Trial(ok, lost=0 if pulled else 1, note=note, info=info)

            _run_trials(out, cfg, log, trial)
            jobs = Counter(t.info.get("job") for t in out.trials)
            out.notes.append(
                f"blob store on a {24}-MiB filesystem filled to within 0-64 KiB; uploads: "
                f"{dict(Counter(str(t.info.get('upload')) for t in out.trials))}; jobs: {dict(jobs)}"
            )
        finally:
            w.stop()
            api.stop()
            rt.close()
            dep.close()
    finally:
        fs_ctx.__exit__(None, None, None)
    return out


def _is_delta(rt: Any, key: str) -> bool:
    from storage.models import Checkpoint

    with rt.sessions() as s:
        return (
            s.scalars(select(Checkpoint.id).where(Checkpoint.delta_blob_key == key)).first()
            is not None
        )


SCENARIOS: dict[str, Callable[[Path, Config, Log], Outcome]] = {
    "worker_kill": worker_kill,
    "api_kill_upload": api_kill_upload,
    "api_kill_download": api_kill_download,
    "gc_during_uploads": gc_during_uploads,
    "s3_outage": s3_outage,
    "pg_restart": pg_restart,
    "disk_full": disk_full,
}


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=None)
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="S3 outage length")
    parser.add_argument("--pg-down-seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")


def main(args: argparse.Namespace) -> int:
    cfg = Config(
        trials=args.trials, outage_seconds=args.outage_seconds, pg_down_seconds=args.pg_down_seconds
    )
    if not pg_ready():
        print("PostgreSQL is not reachable (SLIM_TEST_PG_ADMIN_URL); start it first")
        return 2
    names = args.only or list(SCENARIOS)
    scratch = Path(tempfile.mkdtemp(prefix="slim-faults-"))
    outcomes = []
    started = time.monotonic()
    try:
        for name in names:
            print(f"{name}: {cfg.trials} trials", flush=True)
            outcomes.append(SCENARIOS[name](scratch / name, cfg, lambda m: print(m, flush=True)))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    write_results(outcomes, cfg, args.out, time.monotonic() - started, merge=args.only is not None)
    return 0 if all(_passed(o) for o in outcomes) else 1


def _passed(o: Outcome) -> bool:
    s = o.summary()
    return o.skipped is None and s["successes"] == s["trials"] and s["lost"] == 0


def write_results(
    outcomes: list[Outcome], cfg: Config, out: Path, seconds: float, *, merge: bool = False
) -> None:
    """Write ``faults.{json,md}``; with ``merge``, scenarios not run now keep their old rows."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    rows = {}
    trials = {}
    old_path = out / "faults.json"
    if merge and old_path.exists():
        old = json.loads(old_path.read_text())
        rows = {r["scenario"]: r for r in old.get("scenarios", [])}
        trials = dict(old.get("trials", {}))
    for o in outcomes:
        rows[o.name] = {**o.summary(), "when": now, "config": asdict(cfg)}
        trials[o.name] = [asdict(t) for t in o.trials]
    ordered = [rows[name] for name in SCENARIOS if name in rows]
    doc = {
        "benchmark": "faults",
        "when": now,
        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
        "stack": "PostgreSQL 15 + moto S3 server (MinIO stand-in); slim serve / slim worker "
        "as child processes",
        "config": asdict(cfg),
        "last_run_seconds": round(seconds, 1),
        "scenarios": ordered,
        "trials": trials,
    }
    (out / "faults.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    runs = sorted({r.get("when", now)[:16] for r in ordered})
    lines = [
        "# Fault benchmark",
        "",
        f"`python -m bench faults --trials {cfg.trials}` on {doc['machine']}; {doc['stack']}. "
        f"Run{'s' if len(runs) > 1 else ''}: {', '.join(runs)} (UTC).",
        "",
        "| fault | trials | successes | lost | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in ordered:
        note = "; ".join(r["notes"]) if not r.get("skipped") else f"skipped: {r['skipped']}"
        if r["failures"]:
            note += " — failures: " + " | ".join(r["failures"][:3])
        lines.append(
            f"| {r['scenario']} | {r['trials']} | {r['successes']} | {r['lost']} | {note} |"
        )
    lines += ["", "What each fault checks is in the docstring of `bench/faults.py`.", ""]
    (out / "faults.md").write_text("\n".join(lines))
