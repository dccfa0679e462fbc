"""Methods on a tiny real transformers model: the fitness, NPS's search, determinism."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from core.compress import build_evaluator, compress
from core.delta_format import DeltaReader
from core.errors import EvaluationUnavailable, InvalidArgument, InvalidCalibration
from core.evaluate import ModelEvaluator, length_batches, load_calibration
from core.methods import REGISTRY, FitContext, make_method
from core.methods.nps_seeded import budget_rates, marginal_bits, subspace_costs
from core.methods.prefix import PrefixIndex
from core.methods.subspaces import boundary_ranks, tensor_group
from core.reconstruct import load_state
from core.tensor_codec import ValueSpec
from core.workspace import Workspace


def test_registry_names_papers_and_params() -> None:
    assert set(REGISTRY) == {
        "nps",
        "nps-seeded",
        "magnitude",
        "magnitude-scaled",
        "dare",
        "lossless",
        "lowrank",
        "hybrid",
        "hybrid-seeded",
    }
    for cls in REGISTRY.values():
        assert cls.paper.startswith("https://arxiv.org/abs/")
    with pytest.raises(InvalidArgument, match="unknown method"):
        make_method("zip")
    with pytest.raises(InvalidArgument, match="keep"):
        make_method("nps", keep=0.0)


def test_graded_bins_straddle_the_threshold() -> None:
    ranks = boundary_ranks(1_000_000, 10_000, 8, "graded")
    assert ranks == [1250, 2500, 5000, 10000, 20000, 40000, 80000]
    assert boundary_ranks(800, 10, 8, "equal") == [100, 200, 300, 400, 500, 600, 700]


def test_budget_rates_keep_the_expected_count() -> None:
    sizes = np.array([100.0, 1000.0, 10000.0])
    rho = budget_rates(np.array([2.0, 0.0, -1.0]), sizes, 300.0)
    assert abs(float((rho * sizes).sum()) - 300.0) < 1e-6
    assert rho[0] > rho[1] > rho[2]


def test_marginal_bits_price_entries_by_what_their_codes_cost() -> None:
    """Values with few distinct codes are cheaper to keep than noise-like ones; fixed costs
    (codebook, frame header) do not count; too few values give no estimate."""
    g = torch.Generator().manual_seed(0)
    spec = ValueSpec.from_bits(4, "F32")
    noisy = torch.randn(20_000, generator=g)
    peaked = torch.where(torch.rand(20_000, generator=g) < 0.9, 0.01, 1.0) * noisy.sign()
    dear, cheap = marginal_bits(noisy, spec), marginal_bits(peaked, spec)
    assert dear is not None and cheap is not None
    assert 3.0 < dear <= 4.3 and cheap < 0.5 * dear
    assert marginal_bits(noisy[:10], spec) is None
    ids = {"a": torch.zeros(20_000, dtype=torch.uint8), "b": torch.ones(20_000, dtype=torch.uint8)}
    idx = torch.arange(20_000)
    costs = subspace_costs({"a": (idx, noisy), "b": (idx, peaked)}, ids, 3, {"a": spec, "b": spec})
    assert costs[0] == pytest.approx(dear) and costs[1] == pytest.approx(cheap)
    assert costs[2] == pytest.approx((dear + cheap) / 2)  # no entries: the average


def test_seeded_search_holds_dare_s_expected_bits(tiny_models: dict[str, Path]) -> None:
    """With the bits budget every candidate's expected stored bits equal DARE's at the keep."""
    ws = Workspace(tiny_models["base"], tiny_models["ft"])
    ev = build_evaluator("fidelity", ws, tiny_models["ft"], tiny_models["calibration"])
    ctx = FitContext(keep=0.05, value_bits=4, evaluator=ev)
    res = make_method("nps-seeded", keep=0.05, generations=2).fit(ws, ctx).result
    sizes, rates, cost = (np.array(res[k]) for k in ("sizes", "rates", "bits_per_entry"))
    spent, dare = float((sizes * cost * rates).sum()), 0.05 * float((sizes * cost).sum())
    assert spent == pytest.approx(dare, rel=1e-4)  # (the kept count is ⌈r·D⌉, not r·D)
    assert len(set(np.round(cost, 6))) > 1  # the groups do differ in price here
    assert not np.allclose(rates, 0.05)  # and the search moved the rates


def test_fixed_subspaces_stay_at_dare_s_rate_and_scale(tiny_models: dict[str, Path]) -> None:
    """Token embeddings can be left out of the search (calibration texts exercise few rows)."""
    ws = Workspace(tiny_models["base"], tiny_models["ft"])
    ev = build_evaluator("fidelity", ws, tiny_models["ft"], tiny_models["calibration"])
    ctx = FitContext(keep=0.05, value_bits=4, evaluator=ev)
    res = make_method("nps-seeded", keep=0.05, generations=2, fixed="embed").fit(ws, ctx).result
    e = res["subspaces"].index("embed")
    assert res["fixed"] == ["embed"]
    assert res["rates"][e] == pytest.approx(0.05, rel=1e-3)
    assert res["scales"][e] == pytest.approx(1 / res["rates"][e])
    sizes, rates, cost = (np.array(res[k]) for k in ("sizes", "rates", "bits_per_entry"))
    spent, dare = float((sizes * cost * rates).sum()), 0.05 * float((sizes * cost).sum())
    assert spent == pytest.approx(dare, rel=1e-4)
    assert not np.allclose(np.delete(rates, e), 0.05)
    everything = ",".join(res["subspaces"])
    with pytest.raises(InvalidArgument, match="nothing left to search"):
        make_method("nps-seeded", keep=0.05, fixed=everything).fit(ws, ctx)


def test_tensor_groups() -> None:
    assert tensor_group("bert.encoder.layer.0.attention.self.query.weight", 2) == "attn_in"
    assert tensor_group("bert.encoder.layer.0.attention.output.dense.weight", 2) == "attn_out"
    assert tensor_group("bert.encoder.layer.0.output.dense.weight", 2) == "mlp_out"
    assert tensor_group("bert.encoder.layer.0.intermediate.dense.weight", 2) == "mlp_in"
    assert tensor_group("bert.embeddings.LayerNorm.weight", 1) == "embed"
    assert tensor_group("bert.encoder.layer.0.output.LayerNorm.weight", 1) == "norm"
    assert tensor_group("bert.encoder.layer.0.output.dense.bias", 1) == "bias"
    assert tensor_group("model.layers.0.self_attn.q_proj.weight", 2) == "attn_in"


def _evaluator(tiny: dict[str, Path], kind: str = "fidelity", ws: Workspace | None = None):  # type: ignore[no-untyped-def]
    ws = ws or Workspace(tiny["base"], tiny["ft"])
    return ws, build_evaluator(kind, ws, tiny["ft"], tiny["calibration"], seed=0)


def test_fitness_of_the_fine_tune_itself_is_perfect(tiny_models: dict[str, Path]) -> None:
    ws, ev = _evaluator(tiny_models)
    assert ev is not None and ev.parts == ("search", "holdout")
    ref = ev.run()
    assert ref.metrics["agreement"] == 1.0 and abs(ref.metrics["kl"]) < 1e-9
    for name in ev.tensor_names:  # base weights: the task vector removed
        ev.apply(name, None)
    removed = ev.run()
    assert removed.metrics["agreement"] < 1.0 and removed.fitness < ref.fitness
    for name in ev.tensor_names:  # writing τ back restores the fine-tune
        ev.apply(name, ws.tau(next(p for p in ws.delta_plans if p.name == name)))
    assert ev.run().metrics["agreement"] == 1.0


def test_nps_is_deterministic_and_never_worse_than_its_start(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    common = dict(
        method="nps",
        keep=0.02,
        evaluation="fidelity",
        calibration=tiny_models["calibration"],
        seed=3,
        options={"generations": 3},
    )
    a = compress(tiny_models["base"], tiny_models["ft"], tmp_path / "a.slim", **common)  # type: ignore[arg-type]
    b = compress(tiny_models["base"], tiny_models["ft"], tmp_path / "b.slim", **common)  # type: ignore[arg-type]
    assert (tmp_path / "a.slim").read_bytes() != b"" and a.trace == b.trace
    with DeltaReader(tmp_path / "a.slim") as ra, DeltaReader(tmp_path / "b.slim") as rb:
        assert ra.doc.method["result"]["w"] == rb.doc.method["result"]["w"]
        assert [f.recon_sha256 for f in ra.doc.files] == [f.recon_sha256 for f in rb.doc.files]
    result = a.trace
    start = result[0]["best_fitness"]
    assert all(t["best_fitness"] >= start for t in result)
    assert a.evaluations >= 3 * 4  # generations × population, at least
    progress: list[dict] = []
    compress(
        tiny_models["base"],
        tiny_models["ft"],
        tmp_path / "c.slim",
        progress=progress.append,
        **common,
    )  # type: ignore[arg-type]
    gens = [p["generation"] for p in progress if p.get("phase") == "search"]
    assert gens == [0, 1, 2, 3]


def test_nps_weights_evaluation_reduces_to_magnitude(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    r_nps = compress(
        tiny_models["base"], tiny_models["ft"], tmp_path / "n.slim", method="nps", keep=0.05
    )
    compress(
        tiny_models["base"], tiny_models["ft"], tmp_path / "m.slim", method="magnitude", keep=0.05
    )
    assert any("reduces to magnitude" in n for n in r_nps.notes)
    s1 = load_state(tiny_models["base"], tmp_path / "n.slim")
    s2 = load_state(tiny_models["base"], tmp_path / "m.slim")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_search_methods_beat_plain_magnitude_on_their_fitness(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    args = dict(keep=0.01, evaluation="fidelity", calibration=tiny_models["calibration"], seed=0)
    plain = compress(
        tiny_models["base"], tiny_models["ft"], tmp_path / "p.slim", method="magnitude", **args
    )  # type: ignore[arg-type]
    scaled = compress(
        tiny_models["base"],
        tiny_models["ft"],
        tmp_path / "s.slim",
        method="magnitude-scaled",
        options={"grid": 7, "refine": 2},
        **args,
    )  # type: ignore[arg-type]
    nps = compress(
        tiny_models["base"],
        tiny_models["ft"],
        tmp_path / "n.slim",
        method="nps",
        options={"generations": 4},
        **args,
    )  # type: ignore[arg-type]
    assert (
        plain.fitness_after is not None
        and scaled.fitness_after is not None
        and nps.fitness_after is not None
    )
    assert scaled.fitness_after >= plain.fitness_after - 1e-9
    assert nps.fitness_after >= plain.fitness_after - 1e-9
    # same keep ratio, same storage layout: a search buys fidelity, not bytes
    assert abs(nps.kept - plain.kept) <= 1


def test_accuracy_needs_labels_and_a_classifier(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "a good movie"}\n')
    with pytest.raises(InvalidCalibration, match="label"):
        compress(
            tiny_models["base"],
            tiny_models["ft"],
            tmp_path / "x.slim",
            method="nps",
            evaluation="accuracy",
            calibration=unlabelled,
        )
    with pytest.raises(InvalidArgument, match="calibration"):
        compress(
            tiny_models["base"],
            tiny_models["ft"],
            tmp_path / "x.slim",
            method="nps",
            evaluation="fidelity",
        )
    (tiny_models["root"] / "noconfig").mkdir(exist_ok=True)
    ws = Workspace(tiny_models["base"], tiny_models["ft"])
    with pytest.raises(EvaluationUnavailable, match=r"config\.json"):
        build_evaluator(
            "fidelity", ws, tiny_models["root"] / "noconfig", tiny_models["calibration"]
        )


def test_accuracy_evaluation_reports_accuracy(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    r = compress(
        tiny_models["base"],
        tiny_models["ft"],
        tmp_path / "a.slim",
        method="nps-seeded",
        keep=0.05,
        evaluation="accuracy",
        calibration=tiny_models["calibration"],
        options={"generations": 2},
    )
    assert "accuracy" in r.metrics_after and "accuracy" in r.metrics_reference
    assert r.fidelity is not None and 0 <= r.fidelity <= 2


def test_quantisation_is_applied_inside_the_fitness(tiny_models: dict[str, Path]) -> None:
    ws = Workspace(tiny_models["base"], tiny_models["ft"])
    ev = build_evaluator("fidelity", ws, tiny_models["ft"], tiny_models["calibration"])
    ctx16 = FitContext(keep=0.05, value_bits=16, evaluator=ev)
    ctx1 = FitContext(keep=0.05, value_bits=1, evaluator=ev)
    f16 = make_method("nps", keep=0.05, generations=0).fit(ws, ctx16)
    f1 = make_method("nps", keep=0.05, generations=0).fit(ws, ctx1)
    assert f16.result["fitness_start"] != f1.result["fitness_start"]


@pytest.mark.parametrize("keep", [0.05, 0.9])
def test_magnitude_selects_from_slices_exactly_as_from_whole_task_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: float
) -> None:
    """The worker selects magnitude's entries from τ a slice at a time (τ never whole): same
    delta as selecting from whole task vectors, also with ties at the cut (keep 0.9 cuts
    inside the zeros) and an all-zero tensor before others (its ties are not spent)."""
    import core.taskvector
    import core.topk
    import core.workspace
    from core.compress import compress
    from core.delta_format import DeltaReader
    from core.methods.magnitude import MaskFitted
    from core.safetensors_io import save_file

    for mod in (core.topk, core.taskvector, core.workspace):
        monkeypatch.setattr(mod, "SLICE", 64)  # many slices per tensor
    g = torch.Generator().manual_seed(5)
    base = {f"t{i}": torch.randn(300 + 37 * i, generator=g) for i in range(4)}
    ft = {k: v.clone() for k, v in base.items()}
    for k in ("t1", "t3"):  # t0 and t2 unchanged: all-zero τ
        changed = torch.rand(ft[k].shape, generator=g) < 0.5  # half the entries: zero τ
        ft[k] = torch.where(changed, ft[k] + torch.randn(ft[k].shape, generator=g), ft[k])
    for d, tensors in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors")
    compress(tmp_path / "base", tmp_path / "ft", tmp_path / "s.slim", method="magnitude", keep=keep)
    monkeypatch.setattr(MaskFitted, "streams", False)
    compress(tmp_path / "base", tmp_path / "ft", tmp_path / "w.slim", method="magnitude", keep=keep)
    with DeltaReader(tmp_path / "s.slim") as s, DeltaReader(tmp_path / "w.slim") as w:
        assert [(t.name, t.kind, t.nnz) for t in s.doc.tensors] == [
            (t.name, t.kind, t.nnz) for t in w.doc.tensors
        ]
        assert {t.name: t.kind for t in s.doc.tensors}["t0"] == "same"
        assert all(s.frame(n) == w.frame(n) for n in w.doc.frames)
        assert s.doc.stats["kept"] == w.doc.stats["kept"] == sum(t.nnz for t in s.doc.tensors)


def _batch_cost(lengths: list[int], batches: list[list[int]], per_batch: int) -> int:
    return sum(per_batch + max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_batches_cover_every_example_at_the_least_padded_cost() -> None:
    rnd = np.random.default_rng(0)
    for n, cap in ((1, 4), (6, 3), (8, 8), (9, 2)):
        lengths = [int(x) for x in rnd.integers(3, 65, n)]
        batches = length_batches(lengths, cap, batch_cost=20)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(1 <= len(b) <= cap for b in batches)
        # no split of the length order does better (the order itself is optimal to cut)
        order = sorted(range(n), key=lambda i: lengths[i])
        best = min(
            _batch_cost(lengths, [order[a:b] for a, b in itertools.pairwise((0, *cuts, n))], 20)
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
            if all(b - a <= cap for a, b in itertools.pairwise((0, *cuts, n)))
        )
        assert _batch_cost(lengths, batches, 20) == best
    # a fixed cut into full batches pads short examples to long ones
    lengths = [5] * 30 + [60] * 2
    assert _batch_cost(lengths, length_batches(lengths, 64), 48) < 48 + 60 * 32


def test_prefix_selection_carries_the_same_values_as_a_gather() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(5000, generator=g)
    key = torch.rand(5000, generator=g)
    limits, scales = np.array([0.1, 0.5, 0.02]), np.array([3.0, 0.7, 11.0])
    for sid in (
        torch.randint(0, 3, (5000,), generator=g, dtype=torch.uint8),
        torch.full((5000,), 1, dtype=torch.uint8),
    ):
        idx, values = PrefixIndex.build(sid, key, tau).select(limits, scales)
        expect = torch.nonzero(key < torch.from_numpy(limits).float()[sid.long()]).reshape(-1)
        assert torch.equal(torch.sort(idx).values, expect)
        factor = torch.from_numpy(scales).float()[sid[idx].long()]
        assert torch.equal(values, tau[idx] * factor)  # bit for bit


def test_scores_do_not_depend_on_how_examples_are_batched(tiny_models: dict[str, Path]) -> None:
    ws = Workspace(tiny_models["base"], tiny_models["ft"])
    examples = load_calibration(tiny_models["calibration"], need_labels=False)
    scores = []
    for batch_size in (64, 1):  # length-grouped batches, then every example alone (no padding)
        ev = ModelEvaluator(
            "fidelity", tiny_models["ft"], ws.base, ws.plans, examples, batch_size=batch_size
        )
        for name in ev.tensor_names:
            ev.apply(name, None)
        scores.append(ev.run().metrics)
    assert scores[0]["agreement"] == scores[1]["agreement"]
    assert scores[0]["kl"] == pytest.approx(scores[1]["kl"], rel=1e-4)
