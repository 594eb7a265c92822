"""The claims table across models and the generated results section, on runs with planted effects."""

import json

import fake_runs
from jtc_lens.harness import cli
from jtc_lens.leaderboard import claims, read, results_page

L, N = 8, 40


def _set(metric, value, layers=range(L)):
    def edit(row):
        for l in layers:
            row[f"{metric}.L{l}"] = value(row) if callable(value) else value
    return edit


def _model(root, name, model_id, mat_beats_id: bool, tuned_worse_at_0: bool):
    main = fake_runs.write_run(root / "main" / name, [("id", d, None) for d in ("wikipedia", "news")]
                               + [(p, d, d) for p in ("mat", "affine", "tuned") for d in ("wikipedia", "news")],
                               n_items=N, layers=L, model_name=name, model_id=model_id)
    moved = fake_runs.write_run(root / "transfer" / name, [("mat", "news", "wikipedia")], n_items=N, layers=L,
                                model_name=name, model_id=model_id)
    for d in ("wikipedia", "news"):
        fake_runs.edit_samples(main, f"jtc_id_{d}", _set("p@1", 0.0))
        fake_runs.edit_samples(main, f"jtc_mat_{d}", _set("p@1", 1.0 if mat_beats_id else 0.0))
        for p in ("mat", "affine", "tuned"):
            fake_runs.edit_samples(main, f"jtc_{p}_{d}", _set("kl", 1.0))
        if tuned_worse_at_0:
            fake_runs.edit_samples(main, f"jtc_tuned_{d}", _set("kl", lambda row: 2.0 + 0.01 * row["doc_id"], layers=[0]))
    fake_runs.edit_samples(moved, "jtc_mat_news", _set("p@1", lambda row: float(row["doc_id"] % 4 == 0)))
    return main, moved


def test_claims_hold_and_fail_where_the_effects_were_planted(tmp_path):
    _model(tmp_path, "model-good", "good0000000001", mat_beats_id=True, tuned_worse_at_0=False)
    _model(tmp_path, "model-bad", "bad00000000001", mat_beats_id=False, tuned_worse_at_0=True)
    record = claims.evaluate([tmp_path / "main", tmp_path / "transfer"], n_resamples=500)
    by = {m["name"]: m["claims"] for m in record["models"]}
    good, bad = by["model-good"], by["model-bad"]
    for d in ("wikipedia", "news"):
        assert good["mat_over_id"][d]["holds"] and good["mat_over_id"][d]["significantly_above"] == list(range(L))
        assert good["mat_over_id"][d]["test"] == "mcnemar-exact"
        assert not bad["mat_over_id"][d]["holds"] and bad["mat_over_id"][d]["significantly_above"] == []
        assert good["tuned_vs_mat"][d]["holds"] and good["affine_vs_mat"][d]["holds"]
        assert not bad["tuned_vs_mat"][d]["holds"] and bad["tuned_vs_mat"][d]["significantly_above"] == [0]
    # Wikipedia-fitted mat right on a quarter of the items, against news-fitted mat: all (good) or none (bad)
    assert good["transfer"]["news"]["holds"] and abs(good["transfer"]["news"]["diff"] + 0.75) < 1e-9
    assert not bad["transfer"]["news"]["holds"] and abs(bad["transfer"]["news"]["diff"] - 0.25) < 1e-9
    moved = good["transfer"]["news"]["sources"][0]
    assert moved["fit_on"] == "wikipedia" and moved["results_file"].startswith("transfer/model-good/results_")
    table = claims.markdown(record)
    row = next(line for line in table.splitlines() if line.startswith("| mat reads") and "| wikipedia |" in line)
    assert "**holds**: above at 8/8 layers" in row and "**fails**: above at 0/8 layers" in row


def test_a_missing_sample_is_an_error_in_the_record_and_the_command_fails(tmp_path, capsys):
    main, _ = _model(tmp_path, "model-good", "good0000000001", mat_beats_id=True, tuned_worse_at_0=False)
    path = fake_runs.samples_file(main, "jtc_id_news")
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    out = tmp_path / "claims.json"
    assert cli.main(["claims", str(tmp_path / "main"), str(tmp_path / "transfer"), "--output", str(out),
                     "--resamples", "200"]) == 1
    record = json.loads(out.read_text())
    assert "samples" in record["models"][0]["claims"]["mat_over_id"]["news"]["error"]
    assert "mat_over_id news" in capsys.readouterr().err


def test_the_results_section_is_regenerated_between_its_markers(tmp_path):
    _model(tmp_path, "model-good", "good0000000001", mat_beats_id=True, tuned_worse_at_0=False)
    runs = [str(tmp_path / "main"), str(tmp_path / "transfer")]
    record_file = tmp_path / "claims.json"
    assert cli.main(["claims", *runs, "--output", str(record_file), "--resamples", "200"]) == 0
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nWritten by hand.\n")
    for _ in range(2):  # the second run replaces the section, it does not add another
        assert cli.main(["results-page", *runs, "--claims", str(record_file), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nWritten by hand.\n") and text.count(results_page.markers("results")[0]) == 1
    assert "| model-good | 8 | 40 |" in text  # the summary row: layers and items
    assert "| 7 | 0.88 |" in text  # the per-layer table: layer 7 at depth 7/8
    assert "jtc results-page" in text and "**holds**" in text
    assert cli.main(["results-page", *runs, "--section", "cost", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "| model-good | main | 8 | 80 |" in text and "0.4 GiB" in text  # 8 tasks, 2 sets of 40 items, 400 MiB
    assert text.count(results_page.markers("results")[0]) == 1 and text.count(results_page.markers("cost")[0]) == 1


def test_the_committed_results_pages_match_the_committed_results():
    """docs/results.md and docs/performance.md carry sections generated from docs/paper-run: regenerated from the
    committed files with the command they name, they are unchanged (nobody edited the numbers by hand)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for doc, section in (("docs/results.md", "results"), ("docs/performance.md", "cost")):
        text = (root / doc).read_text("utf-8")
        begin, end = results_page.markers(section)
        block = text[text.index(begin):text.index(end) + len(end)]
        command = re.search(r"generated by `([^`]+)`", block).group(1)
        args = shlex.split(command)[2:]
        results = [a for a in args[:next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]]
        claims_file = args[args.index("--claims") + 1] if "--claims" in args else None
        record = json.loads((root / claims_file).read_text("utf-8")) if claims_file else {}
        assert results_page.render([root / r for r in results], record, command, section) == block, doc


def test_other_distributions_get_summary_rows_and_claims_but_no_per_layer_table(tmp_path):
    _model(tmp_path, "model-good", "good0000000001", mat_beats_id=True, tuned_worse_at_0=False)
    others = fake_runs.write_run(tmp_path / "others" / "code" / "model-good", [("id", "code", None), ("mat", "code", "code")],
                                 n_items=N, layers=L, model_name="model-good", model_id="good0000000001")
    fake_runs.edit_samples(others, "jtc_id_code", _set("p@1", 0.0))
    fake_runs.edit_samples(others, "jtc_mat_code", _set("p@1", 1.0))
    runs = [str(tmp_path / "main"), str(tmp_path / "transfer"), str(tmp_path / "others")]
    record_file = tmp_path / "claims.json"
    assert cli.main(["claims", *runs, "--output", str(record_file), "--resamples", "200"]) == 0
    record = json.loads(record_file.read_text())
    assert record["distributions"] == ["wikipedia", "news", "code"]  # every one evaluated, the paper's two first
    assert record["models"][0]["claims"]["mat_over_id"]["code"]["significantly_above"] == list(range(L))
    doc = tmp_path / "results.md"
    assert cli.main(["results-page", *runs, "--claims", str(record_file), "--update", str(doc)]) == 0
    text = doc.read_text()
    glance = text[text.index("### At a glance"):text.index("### The paper's claims")]
    code = glance.split("**code**")[1]
    assert "| model | layers | items | id | mat |" in code and "| model-good | 8 | 40 |" in code
    assert any(line.startswith("| mat reads") and "| code |" in line for line in text.splitlines())
    per_layer = text[text.index("### Per model and layer"):]
    assert "Per layer on wikipedia and news; code:" in per_layer and "**code**" not in per_layer
    assert "**wikipedia**" in per_layer and "**news**" in per_layer


def test_the_results_page_says_how_far_each_tuned_lens_trained(tmp_path):
    main, _ = _model(tmp_path, "model-good", "good0000000001", mat_beats_id=True, tuned_worse_at_0=False)

    def trained(steps, tokens, budget_spent):
        def edit(prov):
            prov["projector_config"].update({
                "recipe": {"name": "warm", "token_budget": 16384, "loss": "kl"}, "steps": steps, "tokens_spent": tokens,
                "budget_exhausted": budget_spent, "stopped_early": False, "stream_exhausted": not budget_spent,
                "heldout_start": [2.0, 1.0], "heldout_end": [1.5, 1.0], "steps_kept": [steps, 0], "train_seconds": 600.0})
        return edit

    fake_runs.edit_provenance(main, "jtc_tuned_wikipedia", trained(4, 12288, False))
    fake_runs.edit_provenance(main, "jtc_tuned_news", trained(8, 16384, True))
    table = results_page.tuned_training(read.load([tmp_path / "main"]), ("wikipedia", "news"))
    lines = table.splitlines()
    assert lines[2] == ("| model-good | wikipedia | warm | 4 | 12,288 of 16,384 | the train split's stream ran out | "
                        "kl: 1.500 → 1.250 | 1 of 2 | 10 min |")
    assert lines[3].startswith("| model-good | news | warm | 8 | 16,384 of 16,384 | its token budget spent |")
    record = claims.evaluate([tmp_path / "main"], n_resamples=200)
    assert "### How far each tuned lens trained" in results_page.render([tmp_path / "main"], record, "jtc results-page x")
    # runs without a tuned lens: no such section
    assert results_page.tuned_training(read.load([tmp_path / "transfer"]), ("news",)) == ""


def test_a_run_of_exit_tasks_alone_has_its_own_cost_row(tmp_path):
    """A long job split into two requests (lens tasks, then exit tasks) into one folder: the exit request's results
    file holds no lens task, and its wall time and memory still get a row under the model's name."""
    import shutil
    from pathlib import Path

    source = sorted((Path(__file__).resolve().parent.parent / "docs/paper-run/main/news/smollm2-135m").glob("*/results_*.json"))[0]
    folder = tmp_path / "main" / "news" / "smollm2-135m" / source.parent.name
    folder.mkdir(parents=True)
    for f in source.parent.glob("samples_*"):
        shutil.copy(f, folder / f.name)
    data = json.loads(source.read_text())
    exits = {k for k in data["results"] if k.startswith("jtc_exit_")}
    assert exits and len(exits) < len(data["results"])

    def keep(wanted):
        return {k: ({t: v for t, v in data[k].items() if t in wanted} if k in ("results", "configs", "versions", "n-shot",
                "higher_is_better", "n-samples", "task_hashes") else data[k]) for k in data}
    shutil.copy(source, folder / source.name)
    (folder / source.name).write_text(json.dumps(keep(set(data["results"]) - exits)))
    later = dict(keep(exits), total_evaluation_time_seconds=1200.0)
    (folder / "results_2099-01-01T00-00-00.000000.json").write_text(json.dumps(later))
    text = results_page.render([tmp_path / "main"], {}, "jtc results-page main --section cost", "cost")
    rows = [line for line in text.splitlines() if line.startswith("| smollm2-135m | main/news |")]
    assert len(rows) == 2, text
    assert rows[0].split(" | ")[2] == str(len(data["results"]) - len(exits))
    assert rows[1].split(" | ")[2:5] == [str(len(exits)), "3,000", "20 min"]


def test_a_tuned_rerun_counts_the_fit_of_its_affine_start(tmp_path):
    """A rerun of the tuned lens and its exit alone fits the affine projector it starts from; that fit is recorded by
    the exit's base projector and must be counted in the cost row, not shown as 0 min."""
    import shutil
    from pathlib import Path

    sources = sorted((Path(__file__).resolve().parent.parent / "docs/paper-run/main/wikipedia/qwen2.5-coder-0.5b")
                     .glob("*/results_*.json"))
    rerun = next(f for f in sources if set(json.loads(f.read_text())["results"]) == {"jtc_tuned_wikipedia",
                                                                                    "jtc_exit_tuned_wikipedia"})
    folder = tmp_path / "main" / "wikipedia" / "qwen2.5-coder-0.5b" / rerun.parent.name
    folder.mkdir(parents=True)
    for f in rerun.parent.iterdir():
        shutil.copy(f, folder / f.name)
    data = json.loads(rerun.read_text())
    base = data["configs"]["jtc_exit_tuned_wikipedia"]["metadata"]["provenance"]["exit"]["base"]["config"]
    assert base["cache"] == "miss" and float(base["fit_seconds"]) > 60
    text = results_page.render([tmp_path / "main"], {}, "jtc results-page main --section cost", "cost")
    row = next(line for line in text.splitlines()
               if line.startswith("| qwen2.5-coder-0.5b | main/wikipedia | 2 |")).split(" | ")
    assert row[5] == f"{float(base['fit_seconds']) / 60:.0f} min", text
    assert row[6] == f"{data['configs']['jtc_tuned_wikipedia']['metadata']['provenance']['projector_config']['train_seconds'] / 60:.0f} min"
