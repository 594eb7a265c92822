"""Text summaries of results files (`jtc sweep`, `jtc report`) never show a layer mean of r^2."""

import json

from jtc_lens.harness.report import layer_table
from jtc_lens.harness.sweep import summarise

# layer 0's coordinate-averaged r^2 as on Gemma 3 (mat): a layer mean would be about -1,311
R2 = [-3933.0, 0.42, 0.81]
R2W = [-1.5, 0.55, 0.9]


def _results(tmp_path, with_old_mean: bool = False):
    res = {"p@1,none": 0.5, "kl,none": 1.25}
    for l in range(3):
        res.update({f"p@1.L{l},none": 0.5, f"p@1.L{l}_stderr,none": 0.1, f"r2.L{l},none": R2[l], f"r2.L{l}_stderr,none": 1.0,
                    f"r2w.L{l},none": R2W[l], f"r2w.L{l}_stderr,none": 0.1})
    if with_old_mean:
        res["r2,none"] = sum(R2) / 3  # what older runs recorded
    prov = {"model": {"num_layers": 3}, "split": "validation", "items": 10, "protocol": {"name": "paper"}}
    path = tmp_path / "results_x.json"
    path.write_text(json.dumps({"results": {"jtc_mat_news": res}, "configs": {"jtc_mat_news": {"metadata": {"provenance": prov}}}}))
    return path


def test_sweep_summary_gives_the_median_over_layers_of_r2(tmp_path):
    (row,) = summarise(_results(tmp_path, with_old_mean=True))
    assert "r2 median 0.4200" in row and "r2w median 0.5500" in row
    assert "-1310" not in row and "-1,310" not in row


def test_report_tables_give_the_median_over_layers_of_r2_and_say_so(tmp_path):
    table = layer_table(_results(tmp_path), "r2")
    assert "| median over layers | 0.420 |" in table
    assert "mean over layers" not in table
    assert "| mean over layers | 0.500 |" in layer_table(_results(tmp_path), "p@1")


def test_the_comparison_table_gives_per_layer_differences_and_counts_the_layers(tmp_path):
    import json

    from fake_runs import write_run
    from jtc_lens.harness.report import compare_table

    path = write_run(tmp_path / "run", [("tuned", "news", "news"), ("affine", "news", "news"), ("tuned", "code", "code"),
                                        ("affine", "code", "code")], layers=3)
    data = json.loads(path.read_text())
    res = data["results"]
    # plant: on news tuned is below affine at every layer; on code above at layer 1 only (at layer 2 by float
    # rounding only, as a lens that kept affine's map is: equal at the printed precision)
    for l, (news, code) in enumerate(((-0.5, -0.1), (-0.25, 0.3), (-1.0, 3e-7))):
        res["jtc_tuned_news"][f"kl.L{l},none"] = res["jtc_affine_news"][f"kl.L{l},none"] + news
        res["jtc_tuned_code"][f"kl.L{l},none"] = res["jtc_affine_code"][f"kl.L{l},none"] + code
    path.write_text(json.dumps(data))
    table = compare_table(path, "tuned", "affine", "kl")
    lines = table.splitlines()
    assert lines[2] == "| layer | code | news |"
    assert "| 1 | +0.3000 | -0.2500 |" in lines and "| 2 | 0.0000 | -1.0000 |" in lines
    assert "| layers with tuned at or below affine | 2/3 | 3/3 |" in lines


def test_the_compare_table_tests_each_layer_from_the_samples(tmp_path):
    import json

    from fake_runs import edit_samples, samples_file, write_run
    from jtc_lens.harness.report import compare_table

    path = write_run(tmp_path / "run", [("tuned", "news", "news"), ("affine", "news", "news")], layers=3, n_items=40)
    affine = {json.loads(line)["doc"]["item_id"]: json.loads(line)
              for line in samples_file(path, "jtc_affine_news").read_text().splitlines()}

    def plant(row):  # tuned = affine, plus 1 nat at layer 0 and minus 1 at layer 2 on every item
        same = affine[row["doc"]["item_id"]]
        for l, shift in enumerate((1.0, 0.0, -1.0)):
            row[f"kl.L{l}"] = same[f"kl.L{l}"] + shift

    edit_samples(path, "jtc_tuned_news", plant)
    lines = compare_table(path, "tuned", "affine", "kl").splitlines()
    assert "| layers significantly above affine | 1 |" in lines
    assert "| layers significantly below affine | 1 |" in lines
    samples_file(path, "jtc_affine_news").unlink()
    assert "| layers significantly above affine |" not in compare_table(path, "tuned", "affine", "kl")
