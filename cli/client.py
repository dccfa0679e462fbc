"""Client verbs: talk to a Slimstore server through the :mod:`client` SDK.

``slim base push|ls``, ``slim push``, ``slim pull``, ``slim ls``, ``slim show``, ``slim rm``,
``slim status``, ``slim merge``, ``slim stats``, ``slim adapters``. ``slim push`` of a PEFT adapter
directory stores it as it is; ``slim pull`` gives it back, or with ``--merged`` merged into its
base (:meth:`client.SlimClient.pull_merged`). The server and key come from ``--url`` /
``--api-key`` or ``SLIM_URL`` / ``SLIM_API_KEY`` (default http://127.0.0.1:8000, no key).

Progress bars (rich, on stderr) show when stderr is a terminal; otherwise a followed job prints
one line per generation. Results go to stdout (``--json`` for scripts). Errors the server or the
client report carry a stable ``code``; ``cli.main`` prints them as one line and exits 2.

``slim merge`` is registered here, once, for both its forms: ``slim merge ID ID ... --name N``
merges stored checkpoints on the server; ``slim merge BASE_DIR DELTA ... -o OUT`` is the offline
merge of delta files (:func:`cli.offline.cmd_merge`, no server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cli.offline import add_calibration_limit
from core.params import (
    DEFAULT_KEEP,
    DEFAULT_LAMBDA,
    DEFAULT_MERGE_METHOD,
    EVAL_KINDS,
    GENERATIONS_METHODS,
    MERGE_METHODS,
    METHODS,
    VALUE_BITS,
    CompressOutcome,
    Method,
)

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

    from client import Adapter, Checkpoint, Job, PullReport, PushReport, SlimClient

SubParsers = argparse._SubParsersAction


def register(sub: SubParsers) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("server")
    group.add_argument("--url", default=None, help="server URL (default $SLIM_URL or :8000)")
    group.add_argument("--api-key", default=None, help="API key (default $SLIM_API_KEY)")

    p = sub.add_parser("base", help="bases on the server: push, ls, rm")
    base_sub = p.add_subparsers(dest="base_verb", metavar="VERB")
    base_sub.required = True
    q = base_sub.add_parser("push", parents=[conn], help="upload a base model directory")
    q.add_argument(
        "dir", metavar="DIR", help="the base's HF model directory (config, weights, tokenizer)"
    )
    q.add_argument("--name", required=True, help="the base's name (unique on the server)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=cmd_base_push)
    q = base_sub.add_parser("ls", parents=[conn], help="list bases")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=cmd_base_ls)
    q = base_sub.add_parser(
        "rm",
        parents=[conn],
        help="delete a base (refused while checkpoints are stored against it)",
    )
    q.add_argument("ref", metavar="NAME", help="the base's name, id or id prefix")
    q.set_defaults(handler=cmd_base_rm)

    p = sub.add_parser(
        "push",
        parents=[conn],
        help="upload a fine-tune and queue its compression",
        description="Upload a fine-tune of a stored base and queue its compression. Without "
        "--calibration (and without --method/--keep/--value-bits) it is stored exact "
        "(lossless); --min-fidelity 0.99 --calibration FILE stores the smallest delta that "
        "keeps 99% fidelity on your examples. An interrupted push resumes: run it again with "
        "the same options and only the files the server lacks are sent. Pickled files (*.bin, "
        "*.pt, *.pth, *.ckpt, *.pkl) are left out with a warning.",
    )
    p.add_argument(
        "dir",
        metavar="DIR",
        help="the fine-tune's HF model directory, or a PEFT adapter directory "
        "(adapter_config.json + adapter_model.safetensors: stored as it is, see `slim adapters`)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="the base's name or id (required for a fine-tune); for an adapter, a repository "
        "here holding its base, recorded for `slim pull --merged` (default: the one "
        "adapter_config.json names, if it is here)",
    )
    p.add_argument("--name", default=None, help="checkpoint name (default: the directory name)")
    p.add_argument(
        "--method",
        choices=[*METHODS, Method.AUTO],
        default=None,
        help="default: auto with --min-fidelity, nps with --calibration, else lossless",
    )
    quality = p.add_mutually_exclusive_group()
    quality.add_argument(
        "--keep", type=float, default=None, help=f"keep ratio r (default {DEFAULT_KEEP:g})"
    )
    quality.add_argument(
        "--min-fidelity", type=float, default=None, help="auto: smallest encoding above this"
    )
    p.add_argument("--value-bits", type=int, choices=VALUE_BITS, default=None)
    p.add_argument(
        "--eval",
        dest="evaluation",
        choices=EVAL_KINDS,
        default=None,
        help="fitness (default fidelity with --calibration, else weights)",
    )
    p.add_argument("--calibration", default=None, help='JSONL of {"text": ..., "label": ...}')
    add_calibration_limit(p)
    p.add_argument("--generations", type=int, default=None, help="search generations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser(
        "pull",
        parents=[conn],
        help="rebuild a checkpoint into a directory",
        description="Download a checkpoint's files, rebuilt by the server (or, with --local, "
        "only its delta, rebuilt here against a cached copy of the base). Interrupted pulls "
        "resume from the .incomplete files they leave.",
    )
    p.add_argument("ref", metavar="ID", help="checkpoint id, name or id prefix")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--scale", type=float, default=1.0, help="λ of θ_pre + λ·δ (default 1)")
    p.add_argument(
        "--revision",
        default=None,
        metavar="REV",
        help="that revision of the name: a ref (main), a commit id or a prefix of ≥ 7 hex "
        "digits (default: main); `slim log NAME` lists them",
    )
    p.add_argument("--local", action="store_true", help="fetch the delta only; rebuild here")
    p.add_argument(
        "--merged",
        action="store_true",
        help="a PEFT adapter merged into its base's weights (a full model directory, merged "
        "here); without it an adapter is pulled as it was pushed",
    )
    p.add_argument(
        "--base",
        default=None,
        help="--merged: the base to merge into (default: the one recorded at push)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="base cache (default $SLIM_CACHE_DIR or ~/.cache/slimstore)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("ls", parents=[conn], help="list checkpoints")
    p.add_argument("--base", default=None, help="only checkpoints of this base (name or id)")
    p.add_argument("--state", default=None, help="only checkpoints in this state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser(
        "adapters",
        parents=[conn],
        help="list PEFT adapters (rank, targets, size), or describe one",
        description="PEFT adapters are stored as they are, each as a repository's revision "
        "(not as checkpoints: nothing is compressed, so `slim ls` does not list them). "
        "Push one with `slim push ADAPTER_DIR --name NAME [--base BASE]`; pull it with "
        "`slim pull NAME DIR`, or merged into its base with `slim pull NAME DIR --merged`.",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="describe this adapter")
    p.add_argument("--revision", default=None, metavar="REV", help="that revision of NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_adapters)

    p = sub.add_parser("show", parents=[conn], help="describe a checkpoint")
    p.add_argument("ref", metavar="ID")
    p.add_argument("--revision", default=None, metavar="REV", help="that revision of the name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser(
        "log",
        parents=[conn],
        help="a name's revisions, newest first",
        description="The history of a repository: each revision's number, commit id, time, "
        "method, stored size, fidelity, refs and message.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_log)

    repo = sub.add_parser(
        "repo",
        help="repositories pushed through the Hub protocol (create, set)",
        description="A repository's base (what pushes are stored against when their model "
        "card names none) and policy (what pushes are compressed to after their exact copy: "
        "auto at --min-fidelity on the pushed calibration.jsonl by default, nothing lossy "
        "without one). See docs/hub.md.",
    )
    repo_sub = repo.add_subparsers(dest="repo_command", required=True)
    for verb, text in (("create", "create a repository"), ("set", "change its base or policy")):
        p = repo_sub.add_parser(verb, parents=[conn], help=text)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--base", default=None, help="a repository here that holds a base")
        p.add_argument("--method", default=None, help="policy: method (default auto)")
        p.add_argument("--min-fidelity", type=float, default=None, help="policy: auto's floor")
        p.add_argument("--keep", type=float, default=None, help="policy: keep ratio")
        p.add_argument("--value-bits", type=int, default=None, help="policy: value bits")
        p.add_argument(
            "--calibration-file",
            default=None,
            metavar="PATH",
            help="policy: the pushed file holding calibration lines (default calibration.jsonl)",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_repo, verb=verb)

    p = sub.add_parser("rm", parents=[conn], help="delete a checkpoint")
    p.add_argument("ref", metavar="ID")
    p.set_defaults(handler=cmd_rm)

    p = sub.add_parser(
        "status",
        parents=[conn],
        help="a job's state and progress",
        description="Show a job (by job id, or a checkpoint's latest job by its id or name). "
        "With --follow, watch it until it finishes; a failed job then exits 2.",
    )
    p.add_argument("ref", metavar="JOB_ID")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "merge",
        parents=[conn],
        help="merge checkpoints into a new one (server), or delta files (-o, offline)",
        description="Server: slim merge ID ID ... --name N. Offline: slim merge BASE_DIR "
        "DELTA ... -o OUT.slim.",
    )
    p.add_argument("refs", nargs="+", metavar="ID")
    p.add_argument("--name", default=None, help="name of the merged checkpoint (server)")
    p.add_argument("-o", "--output", default=None, help="offline: the merged delta file")
    p.add_argument("--method", choices=MERGE_METHODS, default=str(DEFAULT_MERGE_METHOD))
    p.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA)
    p.add_argument("--density", type=float, default=None, help="ties: trim density")
    p.add_argument(
        "--heads-from",
        default=None,
        metavar="ID",
        help="the parent whose heads (tensors not in the base), config and tokenizer the merge "
        "keeps; needed when they differ (heads are never averaged)",
    )
    p.add_argument("--wait", action="store_true", help="follow the merge job")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("stats", parents=[conn], help="storage totals")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_stats)


# -- handlers ------------------------------------------------------------------------------------


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[SlimClient]:
    from client import SlimClient

    with SlimClient(args.url, args.api_key) as client:
        yield client


def cmd_base_push(args: argparse.Namespace) -> int:
    with _client(args) as client, _transfer_bar() as bar:
        base, report = client.push_base(args.dir, args.name, progress=bar)
    _warn_report(report)
    if args.json:
        return _dump({"base": base.raw, "report": asdict(report)})
    print(
        f"base {base.name} ({base.id[:8]}) {base.state}: {_size(base.total_bytes)}, "
        f"{_count(base.num_params)} parameters — {_push_line(report)}"
    )
    return 0


def cmd_base_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        bases = client.list_bases()
    if args.json:
        return _dump([b.raw for b in bases])
    rows = [[b.id[:8], b.name, b.state, _size(b.total_bytes), _count(b.num_params)] for b in bases]
    _table(["ID", "NAME", "STATE", "SIZE", "PARAMS"], rows)
    return 0


def cmd_base_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        base = client.delete_base(args.ref)
    print(f"deleted base {base.name} ({base.id})")
    return 0


def _warn_report(report: PushReport) -> None:
    """The files a push left out and the server's warnings, on stderr (stdout stays data)."""
    if report.left_out:
        print(
            f"slim: warning: left out {len(report.left_out)} file(s) the server does not read "
            f"(pickled weights): {', '.join(report.left_out)} — Slimstore stores "
            "*.safetensors weights (save_pretrained(..., safe_serialization=True))",
            file=sys.stderr,
        )
    for warning in report.warnings:
        print(f"slim: warning: {warning}", file=sys.stderr)


def cmd_push(args: argparse.Namespace) -> int:
    from core.peft_config import is_adapter_dir

    if is_adapter_dir(args.dir):
        return _push_adapter(args)
    if args.base is None:
        raise _usage("--base is required: the name or id of the base the fine-tune is of")
    options = None
    if args.generations is not None:
        if args.method is not None and args.method not in GENERATIONS_METHODS:
            raise _usage("--generations sets the search of nps, nps-seeded and auto only")
        options = {"generations": args.generations}
    with _client(args) as client:
        with _transfer_bar() as bar:
            ckpt, job, report = client.push(
                args.dir,
                args.base,
                name=args.name,
                method=args.method,
                keep=args.keep,
                min_fidelity=args.min_fidelity,
                value_bits=args.value_bits,
                evaluation=args.evaluation,
                calibration=args.calibration,
                calibration_limit=args.calibration_limit,
                options=options,
                seed=args.seed,
                progress=bar,
            )
        _warn_report(report)
        if not args.json:
            print(f"pushed {ckpt.name} ({ckpt.id[:8]}) — {_push_line(report)}")
            print(f"compression job {job.id[:8]} {job.state} (method {ckpt.method})")
        if args.wait:
            job = _follow(client, job, quiet=args.json)
            ckpt = client.get_checkpoint(ckpt.id)
    if args.json:
        return _dump({"checkpoint": ckpt.raw, "job": job.raw, "report": asdict(report)})
    if args.wait:
        print(_summary(ckpt))
    elif job.done:
        print(_summary(ckpt))  # nothing to follow: e.g. the same files again, already stored
    else:
        print(f"follow it with: slim status {job.id} --follow")
    if ckpt.commit_id is not None:
        print(f"revision {ckpt.revision} of {ckpt.name}: commit {ckpt.commit_id}")
    else:
        print(f"its commit id comes once the job has stored it: slim log {ckpt.name}")
    return 0


_COMPRESSION_FLAGS = {
    "method": "--method",
    "keep": "--keep",
    "min_fidelity": "--min-fidelity",
    "value_bits": "--value-bits",
    "evaluation": "--eval",
    "calibration": "--calibration",
    "generations": "--generations",
}


def _push_adapter(args: argparse.Namespace) -> int:
    given = [flag for key, flag in _COMPRESSION_FLAGS.items() if getattr(args, key) is not None]
    if given:
        raise _usage(
            f"{args.dir} is a PEFT adapter, stored as it is: {', '.join(given)} do not apply"
        )
    with _client(args) as client:
        with _transfer_bar() as bar:
            adapter, report = client.push_adapter(args.dir, args.name, base=args.base, progress=bar)
        _warn_report(report)
        base = client.get_base(adapter.base_id).name if adapter.base_id else None
    if args.json:
        return _dump({"adapter": _adapter_json(adapter), "report": asdict(report)})
    print(f"pushed adapter {adapter.repo_id} — {_push_line(report)}")
    print(f"commit {adapter.commit_id}: {_adapter_line(adapter)}")
    if base is None:
        print("no base recorded: `slim pull --merged` will need --base BASE")
    else:
        print(f"base {base}: `slim pull {adapter.name} DIR --merged` merges into it")
    return 0


def _adapter_json(adapter: Adapter) -> dict[str, Any]:
    return asdict(adapter) | {"size": adapter.size}


def _targets(adapter: Adapter) -> str:
    targets = adapter.target_modules
    return targets if isinstance(targets, str) else ",".join(sorted(targets))


def _adapter_line(adapter: Adapter) -> str:
    return (
        f"LoRA rank {adapter.r}, alpha {adapter.lora_alpha:g} on {_targets(adapter)}, "
        f"{_size(adapter.size)}"
    )


def cmd_adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name is not None:
            adapters = [client.get_adapter(args.name, args.revision)]
        else:
            adapters = client.list_adapters()
        bases = {b.id: b.name for b in client.list_bases()} if adapters else {}
    if args.json:
        return _dump([_adapter_json(a) for a in adapters])
    if args.name is None:
        rows = [
            [
                a.name,
                a.commit_id[:12],
                str(a.r),
                f"{a.lora_alpha:g}",
                _targets(a),
                _size(a.size),
                bases.get(a.base_id or "", "-"),
                a.base_model or "-",
            ]
            for a in adapters
        ]
        _table(
            ["NAME", "COMMIT", "RANK", "ALPHA", "TARGETS", "SIZE", "BASE", "CONFIG'S BASE"], rows
        )
        return 0
    a = adapters[0]
    lines = [
        ("name", a.repo_id),
        ("commit", a.commit_id),
        ("rank", str(a.r)),
        ("alpha", f"{a.lora_alpha:g}"),
        ("targets", _targets(a)),
        ("also saved", ",".join(a.modules_to_save) or None),
        ("task", a.task_type),
        ("size", _size(a.size)),
        ("base", bases.get(a.base_id or "") if a.base_id else None),
        ("config's base", a.base_model),
    ]
    for key, value in lines:
        if value is not None:
            print(f"{key:>13}: {value}")
    for f in a.files:
        print(f"{'file':>13}: {f.path} ({_size(f.size)}, sha256 {f.sha256[:12]})")
    return 0


def cmd_repo(args: argparse.Namespace) -> int:
    fields = {
        "method": args.method,
        "min_fidelity": args.min_fidelity,
        "keep": args.keep,
        "value_bits": args.value_bits,
        "calibration_file": args.calibration_file,
    }
    policy = {k: v for k, v in fields.items() if v is not None} or None
    with _client(args) as client:
        if args.verb == "create":
            repo = client.create_repo(args.name, base=args.base, policy=policy)
        else:
            repo = client.update_repo(args.name, base=args.base, policy=policy)
    if args.json:
        return _dump(repo.raw)
    policy_text = ", ".join(f"{k} {v}" for k, v in repo.policy.items() if v is not None)
    print(f"{repo.namespace}/{repo.name}: base {repo.base_id or '-'}; policy {policy_text}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with _client(args) as client:
        history = client.list_revisions(args.name)
    if args.json:
        return _dump([r.raw for r in history])
    rows = [
        [
            str(r.revision),
            r.commit_id[:12],
            (r.created_at or "")[:19].replace("T", " "),
            r.method or "-",
            _size(r.stored_bytes),
            _num(r.fidelity, "{:.4f}"),
            ",".join(r.refs),
            r.message.partition("\n")[0],
        ]
        for r in history
    ]
    _table(["REV", "COMMIT", "TIME (UTC)", "METHOD", "STORED", "FIDELITY", "REFS", "MESSAGE"], rows)
    return 0


def _revision_text(ckpt: Checkpoint) -> str | None:
    if ckpt.commit_id is None:
        return None
    return f"{ckpt.revision} (commit {ckpt.commit_id})"


def cmd_pull(args: argparse.Namespace) -> int:
    if args.base is not None and not args.merged:
        raise _usage("--base goes with --merged (the base a PEFT adapter is merged into)")
    if args.merged and (args.local or args.scale != 1.0):
        raise _usage("--merged merges a PEFT adapter; --local and --scale do not apply")
    with _client(args) as client, _transfer_bar() as bar:
        adapter = not args.merged and _is_adapter(client, args.ref, args.revision)
        if adapter and (args.local or args.scale != 1.0):
            raise _usage(
                f"{args.ref} is a PEFT adapter, stored as it is: pull it as it is, or merged "
                "into its base with --merged (--local and --scale do not apply)"
            )
        if args.merged:
            report = client.pull_merged(
                args.ref,
                args.out_dir,
                base=args.base,
                revision=args.revision,
                cache_dir=args.cache_dir,
                progress=bar,
            )
        elif adapter:
            report = client.pull_adapter(
                args.ref, args.out_dir, revision=args.revision, progress=bar
            )
        elif args.local:
            report = client.pull_local(
                args.ref,
                args.out_dir,
                scale=args.scale,
                cache_dir=args.cache_dir,
                progress=bar,
                revision=args.revision,
            )
        else:
            report = client.pull(
                args.ref, args.out_dir, scale=args.scale, progress=bar, revision=args.revision
            )
    if args.json:
        return _dump(asdict(report))
    print(_pull_line(args.ref, args.out_dir, report))
    return 0


def _is_adapter(client: SlimClient, ref: str, revision: str | None) -> bool:
    """Whether ``ref`` names a repository whose revision (stored whole) is a PEFT adapter."""
    from client import BadRequest, NotFound

    try:
        held = client.get_revision(ref, revision or "main")
    except (NotFound, BadRequest):
        return False
    if held.base_id is None:
        return False
    try:
        client.get_adapter(ref, held.commit_id)
    except NotFound:
        return False
    return True


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ckpts = client.list_checkpoints(base=args.base, state=args.state)
        bases = {b.id: b.name for b in client.list_bases()} if ckpts and not args.json else {}
    if args.json:
        return _dump([c.raw for c in ckpts])

    rows = [
        [
            c.id[:8],
            c.name,
            bases.get(c.base_id, c.base_id[:8]),
            _encoding(c),  # auto: its choice
            c.state,
            _size(c.original_bytes),
            _size(c.stored_bytes),
            _num(c.ratio, "{:.1f}×"),
            _num(c.bits_per_param, "{:.3f}"),
            _num(c.fidelity, "{:.4f}"),
            _num(c.search_seconds, "{:.1f} s"),
        ]
        for c in ckpts
    ]
    heads = [
        "ID",
        "NAME",
        "BASE",
        "ENCODING",
        "STATE",
        "SIZE",
        "STORED",
        "RATIO",
        "BITS/PARAM",
        "FIDELITY",
        "SEARCH",
    ]
    _table(heads, rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from client import NotFound

    with _client(args) as client:
        try:
            ckpt = client.get_checkpoint(args.ref, revision=args.revision)
        except NotFound:
            if _is_adapter(client, args.ref, args.revision):
                raise NotFound(
                    f"{args.ref} is a PEFT adapter, not a checkpoint; describe it with "
                    f"`slim adapters {args.ref}`"
                ) from None
            raise
        base = client.get_base(ckpt.base_id)
        jobs = client.list_jobs(checkpoint_id=ckpt.id)
    if args.json:
        return _dump(ckpt.raw)
    params, outcome = ckpt.request, ckpt.outcome
    fidelity = _num(outcome.fidelity, "{:.4f}")
    if outcome.fidelity is not None and outcome.fidelity_part:
        fidelity += f" (on {outcome.fidelity_part}: {outcome.fidelity_examples} examples"
        floor = params.min_fidelity
        fidelity += f"; floor {floor})" if outcome.auto and floor is not None else ")"
    lines = [
        ("id", ckpt.id),
        ("name", ckpt.name),
        ("revision", _revision_text(ckpt)),
        ("parent", ckpt.parent_commit),
        ("base", f"{base.name} ({base.id})"),
        ("state", ckpt.state),
        ("method", ckpt.method),
        ("encoding", _encoding(ckpt)),
        ("evaluation", params.evaluation),
        ("size", _size(ckpt.original_bytes)),
        ("stored", _size(ckpt.stored_bytes)),
        ("ratio", _num(ckpt.ratio, "{:.2f}×")),
        ("bits/param", _num(ckpt.bits_per_param, "{:.4f}")),
        ("parameters", _count(ckpt.num_params)),
        ("fidelity", fidelity),
        ("fitness", _fitness_pair(outcome)),
        ("objective", outcome.fitness_objective if _fitness_pair(outcome) else None),
        ("search time", _num(ckpt.search_seconds, "{:.1f} s")),
        ("merged from", _parents(ckpt.derived_from)),
        ("job", f"{jobs[0].id} ({jobs[0].state})" if jobs else None),
        ("error", ckpt.error),
    ]
    for key, value in lines:
        if value not in (None, "", "-"):
            print(f"{key:>12}: {value}")
    for note in outcome.notes:
        print(f"{'note':>12}: {note}")
    search = outcome.search
    for step in search.steps:  # auto's trail: each candidate against the floor, then the choice
        verdict = "passed" if step.passed else "rejected"
        print(
            f"{'auto':>12}: {step.method} keep {step.keep:g} "
            f"{step.value_bits}-bit: fidelity {step.fidelity or 0:.4f} vs "
            f"floor {step.floor} on {step.part} "
            f"({step.examples} examples), {verdict}, {step.seconds} s"
        )
    if search.choice is not None:
        print(f"{'auto chose':>12}: {search.choice.encoded}: {search.choice.reason}")
    points = search.points
    if points:
        first, last = points[0], points[-1]
        print(f"{'search':>12}: {len(points)} steps, best fitness {first[1]:.6g} → {last[1]:.6g}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ckpt = client.delete_checkpoint(args.ref)
    print(f"deleted checkpoint {ckpt.name} ({ckpt.id})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.ref)
        if args.follow:
            job = _follow(client, job, quiet=args.json)
    if args.json:
        return _dump(job.raw)
    _print_job(job)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if args.output is not None:
        if args.name is not None or len(args.refs) < 3:
            raise _usage("offline merge: slim merge BASE_DIR DELTA DELTA ... -o OUT (no --name)")
        from cli.offline import cmd_merge as offline_merge

        offline = argparse.Namespace(
            base_dir=args.refs[0],
            deltas=args.refs[1:],
            output=args.output,
            method=args.method,
            lam=args.lam,
            density=args.density,
            heads_from=args.heads_from,
            json=args.json,
        )
        return int(offline_merge(offline) or 0)
    if args.name is None:
        raise _usage("slim merge ID ID ... --name NAME (or -o OUT for the offline merge)")
    with _client(args) as client:
        job = client.merge(
            args.refs,
            args.name,
            method=args.method,
            lam=args.lam,
            density=args.density,
            heads_from=args.heads_from,
        )
        if args.wait:
            job = _follow(client, job, quiet=args.json)
        ckpt = client.get_checkpoint(job.checkpoint_id)
    if args.json:
        return _dump({"checkpoint": ckpt.raw, "job": job.raw})
    if args.wait:
        print(_summary(ckpt))
    else:
        print(f"merging into {ckpt.name} ({ckpt.id[:8]}): job {job.id[:8]} {job.state}")
        print(f"follow it with: slim status {job.id} --follow")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Storage totals; ``stored`` is split into what it keeps (the server's parts and labels,
    see ``GET /v1/stats``), so the figures read like the dashboard's."""
    with _client(args) as client:
        s = client.stats()
    if args.json:
        return _dump(s.raw)
    saved = s.logical_bytes - s.stored_bytes
    print(f"{'logical':>12}: {_size(s.logical_bytes)} (the models as plain files)")
    print(f"{'stored':>12}: {_size(s.stored_bytes)} (blobs kept, each counted once)")
    parts = s.raw.get("stored_parts") or {}
    labels = s.raw.get("stored_part_labels") or {}
    for part, size in parts.items():
        if size or part in ("bases", "deltas"):
            print(f"{'':>14}{_size(size):>10}  {labels.get(part, part)}")
    print(f"{'saved':>12}: {_size(saved)} ({_num(s.ratio, '{:.2f}×')})")
    print(f"{'bases':>12}: {s.num_bases}")
    print(f"{'checkpoints':>12}: {s.num_checkpoints} {_states(s.checkpoints_by_state)}")
    print(f"{'jobs':>12}: {sum(s.jobs_by_state.values())} {_states(s.jobs_by_state)}")
    return 0


# -- progress ------------------------------------------------------------------------------------


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class _TransferBar:
    """The SDK's transfer progress as a rich bar (bytes, speed, time left)."""

    def __init__(self, progress: RichProgress) -> None:
        self.progress = progress
        self.task: Any = None

    def start(self, description: str, total: int) -> None:
        self.finish()
        self.task = self.progress.add_task(description, total=total or None)

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        if self.task is not None:
            task = next(t for t in self.progress.tasks if t.id == self.task)
            if task.total is not None:
                self.progress.update(self.task, completed=task.total)
            self.progress.stop_task(self.task)
            self.task = None


@contextmanager
def _transfer_bar() -> Iterator[_TransferBar]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not _stderr_is_terminal()) as progress:
        yield _TransferBar(progress)


def _follow(client: SlimClient, job: Job, *, quiet: bool = False) -> Job:
    """Watch a job to its end: a bar (auto: candidates; a search: generations) with one
    readable progress line on a terminal, one line per change otherwise. Raises the SDK's
    ``JobFailed`` if it does not succeed; ^C raises :class:`cli.main.Interrupted` saying the
    job goes on and how to follow or cancel it."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cli.main import Interrupted
    from cli.offline import progress_line

    console = Console(stderr=True)
    live = _stderr_is_terminal() and not quiet
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(),
    )
    last: list[str] = []
    with Progress(*columns, console=console, disable=not live) as progress:
        task = progress.add_task(f"job {job.id[:8]}", total=None, line="")

        def update(j: Job) -> None:
            info = _progress_of(j)
            line = progress_line(info) if info and j.state == "running" else ""
            if info.get("phase") == "auto":
                total, done = info.get("candidates_total"), info.get("candidate_index")
                if info.get("fidelity") is None and isinstance(done, int):
                    done -= 1  # the one being judged is not done yet
            else:
                total, done = info.get("generations"), info.get("generation")
            total = total if isinstance(total, int) and total > 0 else None
            finished = j.state == "succeeded" and total is not None
            progress.update(
                task,
                description=f"job {j.id[:8]} {j.state}",
                total=total,
                completed=total if finished else (done if isinstance(done, int) else 0),
                line=line,
            )
            text = " ".join(x for x in (f"job {j.id[:8]}", j.state, line) if x)
            if not live and not quiet and text not in last[-1:]:
                console.print(text, highlight=False, soft_wrap=True)
                last.append(text)

        try:
            return client.wait(job.id, on_update=update, poll_seconds=1.0)
        except KeyboardInterrupt:
            raise Interrupted(
                f"job {job.id} goes on on the server. Follow it with: slim status {job.id} -f; "
                f"cancel it with: slim rm {job.checkpoint_id} (deletes the checkpoint) or "
                f"POST /v1/jobs/{job.id}/cancel"
            ) from None


# -- output --------------------------------------------------------------------------------------


def _dump(data: Any) -> int:
    print(json.dumps(data, indent=1, default=str))
    return 0


def _table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain aligned columns (readable in a pipe, like ``docker ps``)."""
    if not rows:
        print("(none)")
        return
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(heads)]
    for line in (heads, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _states(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return "(" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"


def _encoding(c: Checkpoint) -> str:
    from cli.offline import checkpoint_encoding

    params, outcome = c.request, c.outcome
    return checkpoint_encoding(c.method, params, outcome)


def _fitness_pair(outcome: CompressOutcome) -> str | None:
    before, after = outcome.fitness_before, outcome.fitness_after
    if before is None and after is None:
        return None
    return f"{_num(before, '{:.6g}')} → {_num(after, '{:.6g}')} (before → after the search)"


def _parents(derived: Any) -> str | None:
    if not isinstance(derived, dict):
        return None
    names = [p.get("name", p.get("id")) for p in derived.get("parents", [])]
    return f"{derived.get('method')} of {', '.join(map(str, names))}"


def _summary(c: Checkpoint) -> str:
    params, outcome = c.request, c.outcome
    head = f"{c.name} {c.state}: {_size(c.original_bytes)} → {_size(c.stored_bytes)} stored"
    if c.ratio is not None:
        head += f" ({c.ratio:.1f}×, {_num(c.bits_per_param, '{:.3f}')} bits/param)"
    tail = [f"as {_encoding(c)}"]
    if outcome.fidelity is not None:
        floor = params.min_fidelity
        tail.append(
            f"fidelity {outcome.fidelity:.4f}" + (f" (floor {floor})" if floor is not None else "")
        )
    if c.search_seconds is not None:
        tail.append(f"search {c.search_seconds:.1f} s")
    return f"{head} {', '.join(tail)}"


def _push_line(report: PushReport) -> str:
    sent = f"{len(report.sent)} file(s) sent ({_size(report.bytes_sent)})"
    skipped = f", {len(report.skipped)} already stored" if report.skipped else ""
    speed = ""
    if report.bytes_sent and report.seconds > 0:
        speed = f" in {report.seconds:.1f} s ({_size(int(report.bytes_sent / report.seconds))}/s)"
    return sent + skipped + speed


def _pull_line(ref: str, out_dir: str, report: PullReport) -> str:
    total = sum(f.size for f in report.files)
    if report.local:
        delta = "delta from the cache"
        if report.delta_bytes:
            delta = f"delta {_size(report.delta_bytes)} fetched"
        base = "base from the cache"
        if report.base_bytes:
            base = f"base {_size(report.base_bytes)} downloaded"
        return (
            f"rebuilt {ref} locally into {out_dir}: {len(report.files)} file(s), "
            f"{_size(total)} ({delta}, {base}) in {report.seconds:.1f} s"
        )
    resumed = sum(1 for f in report.files if f.resumed_from)
    kept = sum(1 for f in report.files if f.skipped)
    extra = "".join(
        [f", {resumed} resumed" if resumed else "", f", {kept} already there" if kept else ""]
    )
    return (
        f"pulled {ref} into {out_dir}: {len(report.files)} file(s), {_size(total)} "
        f"({_size(report.bytes_received)} received{extra}) in {report.seconds:.1f} s"
    )


def _progress_of(job: Job) -> dict[str, Any]:
    """The job's raw progress object (the keys vary by phase; see docs/api.md)."""
    info = job.raw.get("progress")
    return info if isinstance(info, dict) else {}


def _print_job(job: Job) -> None:
    from cli.offline import progress_line

    info = _progress_of(job)
    lines = [
        ("job", job.id),
        ("kind", job.kind),
        ("checkpoint", job.checkpoint_id),
        ("state", job.state),
        ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("progress", progress_line(info) if info else None),
        ("evaluations", info.get("evaluations")),
        ("error", f"[{job.error_code}] {job.error_detail}" if job.error_code else None),
    ]
    for key, value in lines:
        if value is not None:
            print(f"{key:>12}: {value}")


def _usage(message: str) -> Exception:
    from client import BadRequest

    return BadRequest(message, code="usage")
