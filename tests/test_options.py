"""The options schema: one definition, every value checked, unknown keys refused with the valid ones."""

import dataclasses

import numpy as np
import pytest
import torch

from jtc_lens.harness import options
from jtc_lens.harness.options import OptionError, parse_options


@pytest.mark.parametrize("values, message", [
    ({"n_eval": -1}, "n_eval=-1 is not allowed (below 1)"),
    ({"n_eval": 0}, "n_eval=0 is not allowed"),
    ({"n_eval": "abc"}, "n_eval='abc' is not allowed"),
    ({"n_fit": -1}, "n_fit=-1 is not allowed"),
    ({"n_fit": 2.5}, "not a whole number"),
    ({"protocol": "dens"}, "protocol takes paper or dense"),
    ({"seed": True}, "option seed=True"),
    ({"stop_at": 0}, "stop_at takes a number > 0, or none"),
    ({"ridge": -0.1}, "ridge takes a number >= 0, or auto"),
    ({"ridge": "nan"}, "not finite"),
    ({"fit_on": "wikipeida"}, "fit_on takes a registered distribution"),
    ({"allow_unverified_lens": "maybe"}, "not a boolean"),
    ({"n_evl": 5}, "unknown option 'n_evl' (did you mean n_eval?); valid options: split, protocol"),
    ({"colour": "red"}, "unknown option 'colour'; valid options:"),
])
def test_bad_values_and_unknown_keys_are_refused_with_the_option_named(values, message):
    with pytest.raises(OptionError) as err:
        parse_options(values, where="task jtc_mat_news")
    assert message in str(err.value)
    assert str(err.value).startswith("task jtc_mat_news: ")


def test_values_are_typed_and_defaults_fill_the_rest():
    got = parse_options({"n_eval": "all", "n_fit": "900", "stride": "none", "stop_at": "0.5", "ridge": "auto",
                         "fit_on": "file:/tmp/x.txt", "allow_unverified_lens": "true", "projector": "mat"})
    assert got["n_eval"] is None and got["n_fit"] == 900 and got["stride"] is None and got["stop_at"] == 0.5
    assert got["ridge"] == "auto" and got["fit_on"] == "file:/tmp/x.txt" and got["allow_unverified_lens"] is True
    assert got["seed"] == options.default("seed") and "projector" not in got  # task keys are not options


def test_keys_meant_for_the_model_are_ignored_only_when_named():
    assert parse_options({"pretrained": "x", "dtype": "float32"}, ignore={"pretrained", "dtype"})["n_fit"] == 9000
    with pytest.raises(OptionError):
        parse_options({"pretrained": "x"})


def test_tuned_recipe_defaults_come_from_the_schema():
    from jtc_lens.harness.tuned_training import TunedRecipe

    fields = {f.name: f.default for f in dataclasses.fields(TunedRecipe)}
    for field, option in (("name", "recipe"), ("token_budget", "token_budget"), ("chunk_len", "tuned_chunk_len"),
                          ("tokens_per_step", "tokens_per_step"), ("warm_fit_tokens", "warm_fit_tokens"),
                          ("loss", "tuned_loss"), ("stop_at", "stop_at"), ("seed", "seed")):
        assert fields[field] == options.default(option), field


def test_every_option_is_a_sweep_flag_checked_by_the_schema(capsys):
    from jtc_lens.harness.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--models", "x", "--output_path", "/nonexistent", "--n-eval", "-1"])
    assert exit_.value.code == 2
    assert "n_eval='-1' is not allowed (below 1)" in capsys.readouterr().err
    assert main(["sweep", "--models", "x", "--output_path", "/nonexistent", "--metadata", '{"n_evl": 3}']) == 2
    assert "did you mean n_eval?" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser()
    options.add_flags(parser, options.NAMES)
    assert {a.dest for a in parser._actions} >= set(options.NAMES)


def test_model_arguments_are_not_passed_on_as_jtc_options():
    from jtc_lens.harness.lmeval import registration

    kept = registration._without_jtc_options({"pretrained": "m", "fit_on": "news", "n_fit": "10", "dtype": "float32"})
    assert kept == {"pretrained": "m", "dtype": "float32"}
    assert {"pretrained", "dtype"} <= registration.model_argument_names()


def test_lm_eval_task_manager_refuses_a_typo_before_the_model_is_loaded():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(metadata={"pretrained": "some/model", "n_evl": 5})
    with pytest.raises(OptionError, match="did you mean n_eval"):
        tm.match_tasks(["jtc_id_wikipedia"])
    tm = TaskManager(metadata={"pretrained": "some/model", "n_eval": "abc"})
    with pytest.raises(OptionError, match="n_eval='abc'"):
        tm.match_tasks(["jtc_id_wikipedia"])
    # other tasks' runs are none of the plugin's business
    assert TaskManager(metadata={"n_evl": 5}).match_tasks(["arc_easy"]) == ["arc_easy"]


def test_a_task_refuses_an_unknown_key_listing_the_valid_ones():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(metadata={"colour": "red"})
    with pytest.raises(OptionError, match="unknown option 'colour'; valid options: split, protocol"):
        tm.load(["jtc_id_wikipedia"])


# -- ridge and fit-size warnings -----------------------------------------------------------------------


def _problem(n, d, seed=0, noise=1.0):
    """Positions of one linear map (fixed by d) plus noise; ``seed`` draws the positions."""
    A = np.random.default_rng(d).normal(size=(d, d))
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)) * np.linspace(1, 30, d)  # coordinates of very different scales
    y = x @ A + 3.0 + noise * g.normal(size=(n, d))
    return x, y


def _accumulate(x, y):
    from jtc_lens.harness.projectors import GramAccumulator

    acc = GramAccumulator(2, x.shape[1], "last")
    acc.update(torch.from_numpy(np.stack([x, y])))
    return acc


@pytest.mark.parametrize("intercept", [False, True])
def test_ridge_solution_equals_numpy(intercept):
    from jtc_lens.harness.projectors import fit_least_squares

    x, y = _problem(40, 12)
    lam = 0.05
    (M, b), = fit_least_squares(_accumulate(x, y), intercept=intercept, ridge=lam).values()
    xs, ys = (x - x.mean(0), y - y.mean(0)) if intercept else (x, y)
    gram = xs.T @ xs
    expected = np.linalg.solve(gram + lam * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0]), xs.T @ ys)
    np.testing.assert_allclose(M.numpy(), expected, rtol=1e-8, atol=1e-10)
    if intercept:
        np.testing.assert_allclose(b.numpy(), y.mean(0) - x.mean(0) @ expected, rtol=1e-8, atol=1e-10)


def test_held_out_error_from_moments_equals_the_direct_sum():
    from jtc_lens.harness.projectors.least_squares import held_out_error

    x, y = _problem(30, 5, seed=1)
    g = np.random.default_rng(2)
    M, b = g.normal(size=(5, 5)), g.normal(size=5)
    direct = ((x @ M + b - y) ** 2).sum()
    assert held_out_error(_accumulate(x, y), 0, [1], torch.from_numpy(M), torch.from_numpy(b)) == pytest.approx(direct, rel=1e-10)
    assert held_out_error(_accumulate(x, y), 0, [1], torch.from_numpy(M), None) == pytest.approx(((x @ M - y) ** 2).sum(), rel=1e-10)


def test_auto_ridge_penalises_an_underdetermined_fit_and_not_a_well_determined_one():
    from jtc_lens.harness.projectors.least_squares import choose_ridge

    few, few_y = _problem(20, 16, seed=3, noise=30.0)  # 20 noisy positions for 16 dimensions
    held, held_y = _problem(400, 16, seed=4, noise=30.0)
    chosen, errors = choose_ridge(_accumulate(few, few_y), _accumulate(held, held_y), intercept=True)
    assert chosen[0] > 0 and min(errors[0]) < 1.0
    many, many_y = _problem(5000, 16, seed=5, noise=30.0)
    chosen, _ = choose_ridge(_accumulate(many, many_y), _accumulate(held, held_y), intercept=True)
    assert chosen[0] <= 1e-4


def test_fit_positions_below_ten_per_dimension_are_warned_about():
    from jtc_lens.harness.fitting import fit_warnings

    assert fit_warnings(6400, 640) == []
    (warning,) = fit_warnings(1500, 640)
    assert "1500 fit positions for d = 640" in warning and "2.3 per dimension" in warning


def test_auto_ridge_end_to_end_is_recorded_and_keyed_in_the_cache():
    import tiny
    from fixture_corpus import fixture_distribution
    from jtc_lens.harness.fitting import FitSpec, get_least_squares
    from jtc_lens.harness.models import build_lens_model
    from jtc_lens.harness.protocols import ProtocolConfig

    lens = build_lens_model(*tiny.build("llama"))
    protocol = ProtocolConfig("paper", seed=5)
    plain = get_least_squares(lens, FitSpec(fixture_distribution(), protocol, 40), batch_size=8)
    auto = get_least_squares(lens, FitSpec(fixture_distribution(), protocol, 40, ridge="auto"), batch_size=8)
    assert auto.info["cache"] == "miss"  # another ridge is another cache entry
    assert plain.info["ridge"] == 0.0 and auto.info["ridge"] == "auto" and auto.info["held_out_items"] == 8
    for name in ("mat", "affine"):
        chosen = auto.info["ridge_chosen"][name]
        assert set(chosen) == {str(l) for l in range(lens.num_layers)}
        assert all(lam in options_grid() for lam in chosen.values())
    assert auto.info["warnings"] and "40 fit positions for d = 32" in auto.info["warnings"][0]
    M, _ = auto.mat.solutions[(0, lens.num_layers)]
    assert torch.isfinite(M).all()


def options_grid():
    from jtc_lens.harness.projectors.least_squares import RIDGE_GRID

    return RIDGE_GRID


def test_readme_lists_every_option_with_its_default():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    assert options.markdown_table() in readme, "README's option table differs from harness/options.py: regenerate it"
