"""Leaderboard pages without an lm-eval run: chart hover tips and atomic page writes."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest

from jtc_lens.harness import store
from jtc_lens.leaderboard import svg
from jtc_lens.leaderboard.build import build_site

CIRCLE = re.compile(r'<circle cx="([0-9.]+)" cy="([0-9.]+)"[^>]*><title>([^<]*)</title></circle>')


def test_tips_stay_with_their_points_when_points_are_left_out():
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    ys = [1.0, math.nan, 3.0, None, 2.0]  # layers 1 and 3 have no value and are not drawn
    series = svg.Series(label="mat", xs=xs, ys=ys, tips=[f"layer {k}: {y}" for k, y in enumerate(ys)], projector="mat")
    chart = svg.line_chart([series], title="t", y_label="y")
    circles = [(float(cx), float(cy), tip) for cx, cy, tip in CIRCLE.findall(chart)]
    assert [tip for _, _, tip in sorted(circles)] == ["layer 0: 1.0", "layer 2: 3.0", "layer 4: 2.0"]
    # and each drawn where its own value is: higher values sit higher (smaller y in SVG)
    by_tip = {tip: cy for _, cy, tip in circles}
    assert by_tip["layer 2: 3.0"] < by_tip["layer 4: 2.0"] < by_tip["layer 0: 1.0"]


def site_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pages_are_written_atomically(tmp_path, monkeypatch):
    # a site with no usable run still has its pages (index listing the problem, transfer, runs, comparisons.json)
    out = tmp_path / "site"
    build_site([tmp_path / "no-results-here"], out, stream=io.StringIO())
    before = site_files(out)
    assert {"index.html", "transfer.html", "runs.html", "comparisons.json"} <= set(before)

    # a second build is stopped while its second file is being put in place
    real_replace, calls = store.os.replace, []

    def stopped(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped mid-build")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_site([tmp_path / "other-results"], out, stream=io.StringIO())
    monkeypatch.undo()

    after = site_files(out)
    assert set(after) == set(before), "a temporary file was left behind"
    stopped_page = Path(calls[1]).name
    assert after[stopped_page] == before[stopped_page]  # the page being written is the old one, whole
    for name, data in after.items():
        if name.endswith(".html"):
            assert data.rstrip().endswith(b"</html>"), f"{name} is cut short"
    assert b"other-results" in after[Path(calls[0]).name]  # the first page was replaced by the new build's


def test_the_landing_page_compares_models_by_size_with_the_random_control_last(tmp_path):
    import json

    from fake_runs import write_run
    from jtc_lens.leaderboard.build import build_site

    tasks = [("id", "wikipedia", None), ("mat", "wikipedia", "wikipedia")]
    big = write_run(tmp_path / "big", tasks, model_name="big-model", model_id="bigmodel00000001", layers=4, seed=1,
                    provenance={"model_record": {"name": "big-model", "original": "org/big", "weights": "4-bit"}})
    small = write_run(tmp_path / "small", tasks, model_name="small-model", model_id="smallmodel000001", layers=3, seed=2)
    control = write_run(tmp_path / "control", tasks, model_name="small-model-random", model_id="randommodel00001", layers=3,
                        seed=3, provenance={"model_record": {"name": "small:random:0", "weights": "random",
                                                             "random_init": {"seed": 0, "architecture_of": "small"}}})
    for path, n in ((big, 5000), (small, 1000), (control, 1000)):  # parameter counts order the rows
        data = json.loads(path.read_text())
        data["config"]["model_num_parameters"] = n
        path.write_text(json.dumps(data))
    site = build_site([tmp_path / "big", tmp_path / "small", tmp_path / "control"], tmp_path / "site")
    index = next(p for p in site.pages if p.name == "index.html").read_text()
    section = index[index.index('id="across-models"'):index.index("Ranking by layer-averaged")]
    order = [section.index(n) for n in ("small-model<", "big-model<", "small:random:0<")]
    assert order == sorted(order)  # by size, the control last
    assert 'class="control"' in section and "random-weights controls" in section
    mat_small = json.loads(small.read_text())["results"]["jtc_mat_wikipedia"]["p@1,none"]
    assert f"{mat_small:.3f}" in section
    assert section.count('class="metric-chart"') == 2  # P@1 against depth for id and for mat, a line per model


def test_legend_keeps_models_with_a_common_prefix_apart():
    import re

    from jtc_lens.leaderboard import svg

    names = ["smollm2-135m", "smollm2-135m:random:0", "qwen2.5-coder-1.5b-instruct-long-name:random:12"]
    chart = str(svg.line_chart([svg.Series(n, [0.0, 1.0], [0.1, 0.2], index=k) for k, n in enumerate(names)],
                               title="t", x_label="x", y_label="y"))
    shown = re.findall(r'<text class="legend"[^>]*>([^<]*)<title>', chart)
    assert shown[:2] == names[:2]  # whole: the random control is not cut back to its model's name
    assert len(set(shown)) == 3 and len(shown[2]) == svg.LEGEND_MAX_CHARS and shown[2].endswith(":random:12")
    width = int(re.search(r'viewBox="0 0 (\d+) ', chart).group(1))
    plot_right = max(float(x) for x in re.findall(r'<rect class="frame" x="([\d.]+)"', chart))
    assert width >= 600 and plot_right < width  # the legend's margin grew, the plot shrank to make room


def test_a_gguf_that_unties_the_output_matrix_says_so_beside_the_parameter_count(tmp_path):
    import json

    from fake_runs import write_run
    from jtc_lens.harness import bundled
    from jtc_lens.leaderboard.build import build_site
    from jtc_lens.leaderboard.scales import markdown

    untied = bundled.get("qwen2.5-coder-0.5b")
    tied = bundled.get("smollm2-135m")
    assert untied.output_apart and not tied.output_apart
    tasks = [("id", "wikipedia", None)]
    for name, model, n in (("untied", untied, 20_000), ("tied", tied, 10_000)):
        path = write_run(tmp_path / name, tasks, model_name=f"{name}-model", model_id=f"{name}model0000001"[:16],
                         provenance={"model_record": {"name": model.name, "gguf_sha256": model.sha256}})
        data = json.loads(path.read_text())
        data["config"]["model_num_parameters"] = n
        path.write_text(json.dumps(data))
    # the fake runs' model: vocabulary 400, d 32, so the output matrix holds 12,800 of the 20,000
    site = build_site([tmp_path / "untied", tmp_path / "tied"], tmp_path / "site")
    pages = {p.name: p.read_text() for p in site.pages}
    note = "apart from the token embeddings, so both are counted; the original checkpoint ties them: 7.2k"
    assert note in pages["index.html"] and "(12.8k)" in pages["index.html"]
    marks = pages["index.html"].count("<sup title=")
    assert marks == 3 and pages["index.html"].count("†") == marks + 1  # across table, ranking and card; one footnote
    assert "† qwen2.5-coder-0.5b: 20k parameters as loaded" in pages["index.html"]  # named by its model record
    untied_page = next(v for k, v in pages.items() if k.startswith("model-") and "<h1>qwen2.5-coder-0.5b" in v)
    tied_page = next(v for k, v in pages.items() if k.startswith("model-") and "<h1>smollm2-135m" in v)
    assert "20k, as loaded: the GGUF" in untied_page and "as loaded" not in tied_page
    text = markdown([tmp_path / "untied", tmp_path / "tied"], distributions=("wikipedia",))
    assert text.count("Parameters as loaded:") == 1 and "ties them: 7.2k." in text
