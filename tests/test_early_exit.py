"""Early exit: the paper's exit rule and curve on planted records, the engine's records against the lens metrics,
one forward pass shared with the lens tasks, and the stock lm_eval command printing the headline numbers."""

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from fixture_corpus import fixture_distribution
from installed import run_lm_eval_on_tiny_model
from jtc_lens.harness import early_exit
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec
from jtc_lens.harness.metrics import CONFIDENCE, lens_metrics
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items

PAPER = ProtocolConfig("paper", seed=3)


def _record(t, length, conf, correct, base=None, item_id=None):
    rec = {"item_id": item_id or f"i{t}", "blocks": len(conf) + 1, "length": length, "t": [t], "seed": 0,
           "lens": {"conf": [conf], "correct": [correct]}, "base_projector": "id" if base else None}
    if base:
        rec["base"] = {"conf": [base[0]], "correct": [base[1]]}
    return rec


# Two items of a 4-block model (exit layers 1, 2, 3), both 10 tokens long, so N = 10.
# Item A at t = 0: threshold 0.9 lambda + 0.1.   Item B at t = 5: 0.9 lambda + 0.1 exp(-2) = 0.9 lambda + 0.01353.
PLANTED = [_record(0, 10, [0.3, 0.6, 0.9], [0, 1, 1]), _record(5, 10, [0.05, 0.5, 0.92], [1, 0, 1])]


def test_the_exit_rule_by_hand_on_a_planted_example():
    used, ok = early_exit.item_table(PLANTED, lambdas=np.array([0.0, 0.5, 1.0]))
    # lambda 0:   A exits at layer 1 (0.3 > 0.1), wrong;     B at layer 1 (0.05 > 0.0135), right
    # lambda 0.5: A exits at layer 2 (0.6 > 0.55), right;    B at layer 2 (0.5 > 0.4635), wrong
    # lambda 1:   A never exits (0.9 < 1.0): 4 blocks, right; B at layer 3 (0.92 > 0.9135), right
    assert used.tolist() == [[0.25, 0.5, 1.0], [0.25, 0.5, 0.75]]
    assert ok.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    u, a = used.mean(0), ok.mean(0)  # (0.25, 0.5), (0.5, 0.5), (0.875, 1), closed by (1, 1)
    # 95% is reached on the segment (0.5, 0.5) - (0.875, 1) at 0.5 + 0.45 / 0.5 * 0.375 = 0.8375 of the blocks
    assert early_exit.blocks_saved(u, a, 0.95) == pytest.approx(1 - 0.8375)
    assert early_exit.blocks_saved(u, a, 0.99) == pytest.approx(1 - (0.5 + 0.49 / 0.5 * 0.375))
    assert early_exit.blocks_saved(u, a, 0.5) == pytest.approx(0.75)  # the first point already retains 50%


def test_blocks_saved_takes_the_cheapest_point_of_a_curve_that_is_not_monotone():
    used, acc = np.array([0.2, 0.4, 0.6]), np.array([0.96, 0.5, 0.97])
    assert early_exit.blocks_saved(used, acc, 0.95) == pytest.approx(0.8)
    # never reaching the retention before the full model: nothing saved
    assert early_exit.blocks_saved(np.array([0.3, 0.9]), np.array([0.5, 0.6]), 0.95) == pytest.approx(
        1 - (0.9 + (0.95 - 0.6) / 0.4 * 0.1))
    assert early_exit.blocks_saved(np.array([0.3]), np.array([0.1]), 1.0) == pytest.approx(0.0)


def test_the_paired_difference_and_its_bootstrap_interval():
    rng = np.random.default_rng(0)
    same, better = [], []
    for k in range(60):
        conf = sorted(rng.uniform(0, 1, 3).round(3).tolist())
        correct = [int(rng.uniform() < 0.8), 1, 1]
        same.append(_record(k % 20, 20, conf, correct, base=(conf, correct), item_id=f"item{k}"))
        # a base that is never confident never exits: it saves nothing
        better.append(_record(k % 20, 20, conf, correct, base=([0.0, 0.0, 0.0], [1, 1, 1]), item_id=f"item{k}"))
    tie = early_exit.paired_difference(same, 0.9, seed=1, resamples=200)
    assert tie["difference"] == tie["low"] == tie["high"] == 0.0
    better.sort(key=lambda r: r["item_id"])  # as the aggregation orders them before resampling
    lead = early_exit.paired_difference(better, 0.9, seed=0)  # as the aggregation: the records' seed, 1000 resamples
    saved = early_exit.AGGREGATIONS["saved@90"](better)
    assert saved > 0 and lead["difference"] == pytest.approx(saved)
    assert lead["low"] <= lead["difference"] <= lead["high"] and lead["high"] > lead["low"]
    assert early_exit.AGGREGATIONS["saved_diff@90_lo"](better) == pytest.approx(lead["low"])
    assert lead == early_exit.paired_difference(better, 0.9, seed=0)  # seeded


def test_an_item_twice_counts_once_and_two_different_records_of_one_item_stop_the_aggregation():
    saved = early_exit.AGGREGATIONS["saved@95"](PLANTED)
    assert early_exit.AGGREGATIONS["saved@95"](PLANTED + [dict(PLANTED[0])]) == saved  # lm-eval's padding repeats one
    other = dict(PLANTED[0], t=[3])
    with pytest.raises(ValueError, match="two different exit records"):
        early_exit.AGGREGATIONS["saved@95"](PLANTED + [other])


def test_records_of_another_model_are_not_aggregated_together():
    other = _record(1, 10, [0.1, 0.2], [1, 1])  # 3 blocks, not 4
    with pytest.raises(ValueError, match="different models"):
        early_exit.AGGREGATIONS["saved@95"](PLANTED + [other])


def _setup(layers=4):
    name = fixture_distribution()
    lens = build_lens_model(*tiny.build("llama", layers=layers))
    items = build_items(get_corpus(name), "validation", PAPER, limit=24)
    return name, lens, items, FitSpec(name, PAPER, n_fit=400)


def test_exit_records_agree_with_the_lens_metrics_of_the_same_items():
    name, lens, items, fit = _setup()
    lens_requests = [EvalRequest("mat", name, "validation", PAPER, it, fit) for it in items]
    exit_requests = [EvalRequest("mat", name, "validation", PAPER, it, fit, analysis="exit", base=("id", None))
                     for it in items]
    id_requests = [EvalRequest("id", name, "validation", PAPER, it) for it in items]
    out = Engine(lens, batch_size=5).run(lens_requests + exit_requests + id_requests)
    n = len(items)
    L = lens.num_layers
    for k in range(n):
        record = out[n + k]["exit"]
        assert record["blocks"] == L and len(record["t"]) == 1
        # correctness at exit layer l is the item's P@1 at layer l, for the projector and for its base
        assert record["lens"]["correct"][0] == [int(out[k][f"p@1.L{l}"]) for l in range(1, L)]
        assert record["base"]["correct"][0] == [int(out[2 * n + k][f"p@1.L{l}"]) for l in range(1, L)]
        assert record["t"][0] == out[k]["position"]
        assert all(0.0 <= c <= 1.0 for c in record["lens"]["conf"][0])
    summary = out[n]["provenance"]["exit"]
    assert summary["items"] == n and summary["base"]["projector"] == "id"
    assert summary["curve"]["blocks_saved"]["0.95"] == pytest.approx(
        early_exit.AGGREGATIONS["saved@95"]([o["exit"] for o in out[n:2 * n]]), abs=1e-6)
    assert len(summary["curve"]["lambdas"]) >= 50
    assert "exit" not in out[0]["provenance"]  # the lens tasks' record is their own


def test_confidence_is_the_gap_between_the_two_most_probable_tokens():
    gen = torch.Generator().manual_seed(0)
    final, lens_logits = torch.randn(5, 50, generator=gen) * 3, torch.randn(2, 5, 50, generator=gen) * 3
    got = lens_metrics(final, lens_logits, torch.zeros(5, dtype=torch.long))[CONFIDENCE]
    top = torch.softmax(lens_logits.double(), -1).topk(2, dim=-1).values
    assert torch.allclose(got.double(), top[..., 0] - top[..., 1], atol=1e-6)


def test_lens_and_exit_requests_share_one_forward_pass_per_item_and_one_fit():
    name, lens, items, fit = _setup()
    calls = []
    hook = lens.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        lens_only = [EvalRequest(p, name, "validation", PAPER, it, None if p == "id" else fit) for p in ("id", "mat") for it in items]
        Engine(lens, batch_size=5).run(lens_only)  # fits mat and caches it
        calls.clear()
        Engine(lens, batch_size=5).run(lens_only)
        lens_passes = len(calls)
        calls.clear()
        both = lens_only + [EvalRequest("mat", name, "validation", PAPER, it, fit, analysis="exit", base=("id", None))
                            for it in items]
        Engine(lens, batch_size=5).run(both)
        assert len(calls) == lens_passes  # the exit records came from the lens pass: no item ran twice
    finally:
        hook.remove()


def test_lm_eval_prints_the_exit_headline_numbers(tmp_path):
    metadata = {"corpus": fixture_distribution(), "n_eval": 30, "n_fit": 300}
    proc, results, results_file, out = run_lm_eval_on_tiny_model(
        tmp_path, "custom_jtc_exit_id,custom_jtc_exit_mat,custom_jtc_mat", metadata)
    assert "saved@95" in proc.stdout and "saved_diff@95_lo" in proc.stdout
    mat = results["results"]["custom_jtc_exit_mat"]
    for r in ("99", "95", "90"):
        assert 0.0 <= mat[f"saved@{r},none"] <= 1.0
        assert mat[f"saved_diff@{r}_lo,none"] <= mat[f"saved_diff@{r},none"] <= mat[f"saved_diff@{r}_hi,none"]
    assert "saved_diff@95,none" not in results["results"]["custom_jtc_exit_id"]  # id has no base
    prov = results["configs"]["custom_jtc_exit_mat"]["metadata"]["provenance"]
    assert prov["exit"]["curve"]["blocks_saved"]["0.95"] == pytest.approx(mat["saved@95,none"], abs=1e-6)
    assert math.isclose(prov["exit"]["paired_difference"]["0.95"]["difference"], mat["saved_diff@95,none"], abs_tol=1e-9)
    samples = glob.glob(str(out / "*" / "samples_custom_jtc_exit_mat_*.jsonl"))[0]
    first = json.loads(Path(samples).read_text().splitlines()[0])
    assert first["saved@95"]["blocks"] == 4 and len(first["saved@95"]["lens"]["conf"][0]) == 3
    from jtc_lens.harness.sweep import summarise

    (line,) = [row for row in summarise(Path(results_file)) if "custom_jtc_exit_mat" in row]
    assert f"{mat['saved@95,none']:.4f}" in line and f"{mat['saved_diff@95,none']:+.4f}" in line
    from jtc_lens.harness.report import exit_table

    table = exit_table(Path(results_file))
    assert f"{100 * mat['saved@95,none']:.1f}" in table and f"{100 * mat['saved_diff@95,none']:+.1f}" in table
    # the leaderboard shows the exit table and curve on the model's page
    from jtc_lens.leaderboard.build import build_site

    site = build_site([out], tmp_path / "site")
    page = next(p for p in site.pages if p.name.startswith("model-")).read_text()
    assert "Early exit" in page and f"{mat['saved@95,none'] * 100:.1f}%" in page
    assert page.count('class="exit-table"') == 1 and "vs id" in page
