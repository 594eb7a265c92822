"""The static leaderboard, built from a real lm-eval run of a tiny random model (run once per session)."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import tiny
from installed import lm_eval_launch
from jtc_lens.harness.cli import main as jtc
from jtc_lens.harness.stats import compare
from jtc_lens.leaderboard.build import N_RESAMPLES, build_site, fmt

# realdata: the shared lm_eval run reads the bundled news and wikipedia corpora (two distributions in one run)
pytestmark = [pytest.mark.slow, pytest.mark.realdata]

# lm-eval accepts this folder name; a name cannot hold "/", so the closing tag is injected afterwards (see results_tree).
MODEL_DIR_NAME = "tiny-<script>alert(1)"
EVIL_NAME = "<script>alert(1)</script>"
TASKS = [f"jtc_{p}_{d}" for d in ("news", "wikipedia") for p in ("id", "mat", "affine")]
COMPARED = ("p@1", "surprisal", "kl")
PAIRS = (("mat", "id"), ("affine", "mat"))
LAYERS = 3
_RUN: dict[str, Path] = {}  # one lm_eval run per session, shared with the browser tests that import these fixtures


@pytest.fixture(scope="session")
def lm_eval_out(tmp_path_factory) -> Path:
    """lm-eval output folder of one run of the tiny llama on news and wikipedia, all three projectors."""
    if "out" in _RUN:
        return _RUN["out"]
    launch = lm_eval_launch(dict(os.environ))
    if launch is None:
        pytest.skip("neither an installed jtc-lens wheel nor this checkout's task folder is available to lm_eval")
    prefix, env = launch
    root = tmp_path_factory.mktemp("lb-run")
    model, tok = tiny.build("llama", layers=LAYERS)
    model_dir = root / MODEL_DIR_NAME
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = root / "out"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(root / "cache"), TQDM_DISABLE="1")
    cmd = prefix + ["--model", "hf", "--model_args", f"pretrained={model_dir}", "--tasks", ",".join(TASKS),
                    "--output_path", str(out), "--log_samples", "--metadata", json.dumps({"n_eval": 12, "n_fit": 60})]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    assert "<script>" in json.loads(Path(results).read_text())["model_name"]  # lm-eval kept the name
    _RUN["out"] = out
    return out


def _results_file(tree: Path) -> Path:
    (path,) = glob.glob(str(tree / "**" / "results_*.json"), recursive=True)
    return Path(path)


def _edit_results(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def results_tree(lm_eval_out, tmp_path_factory) -> Path:
    """A copy of the run whose recorded model name is the whole ``<script>alert(1)</script>``.

    The folder name already carries "<script>", but a path cannot carry the closing tag's "/", so the
    provenance's model name is replaced in the copy; everything else is the run as lm-eval wrote it.
    """
    if "tree" in _RUN:
        return _RUN["tree"]
    tree = _copy_run(lm_eval_out, tmp_path_factory.mktemp("lb-results") / "run")

    def rename(data):
        for task in data["configs"].values():
            task["metadata"]["provenance"]["model"]["name"] = EVIL_NAME

    _edit_results(_results_file(tree), rename)
    _RUN["tree"] = tree
    return tree


@pytest.fixture(scope="session")
def site(results_tree, tmp_path_factory) -> Path:
    if "site" in _RUN:
        return _RUN["site"]
    out = tmp_path_factory.mktemp("lb-site")
    result = build_site([results_tree], out, stream=io.StringIO())
    assert result.warnings == []
    _RUN["site"] = out
    return out


# ---------------------------------------------------------------------------------------------
# Reading the pages


class _Tables(HTMLParser):
    """Every <table>: its attributes and rows of (cell attributes, cell text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self._stack: list[dict] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._stack.append({"attrs": dict(attrs), "rows": [], "head": []})
        elif tag == "tr" and self._stack:
            self._stack[-1]["rows"].append([])
        elif tag in ("td", "th") and self._stack:
            self._cell = {"attrs": dict(attrs), "text": "", "tag": tag}

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._stack:
            self._cell["text"] = " ".join(self._cell["text"].split())
            self._stack[-1]["rows"][-1].append(self._cell)
            self._cell = None
        elif tag == "table" and self._stack:
            self.tables.append(self._stack.pop())

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def tables(html: str) -> list[dict]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def ranking_rows(index_html: str) -> list[dict[str, dict]]:
    (table,) = [t for t in tables(index_html) if t["attrs"].get("id") == "ranking"]
    header = [c["text"].strip() for c in table["rows"][0]]
    return [dict(zip(header, row)) for row in table["rows"][1:]]


def model_page(site_dir: Path) -> str:
    (page,) = glob.glob(str(site_dir / "model-*.html"))
    return Path(page).read_text()


def _samples(tree: Path, task: str) -> tuple[list[str], dict[str, dict[int, list[float]]]]:
    (path,) = glob.glob(str(tree / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    ids, values = [], {m: {l: [] for l in range(LAYERS)} for m in COMPARED}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        ids.append(row["doc"]["item_id"])
        for m in COMPARED:
            for l in range(LAYERS):
                values[m][l].append(row[f"{m}.L{l}"])
    return ids, values


# ---------------------------------------------------------------------------------------------
# Tests


def test_ranking_table_matches_the_results_json(site, results_tree):
    results = json.loads(_results_file(results_tree).read_text())["results"]
    rows = ranking_rows((site / "index.html").read_text())
    assert len(rows) == len(TASKS)
    seen = set()
    for row in rows:
        task = f"jtc_{row['Projector']['text']}_{row['Distribution']['text']}"
        seen.add(task)
        p1, kl = results[task]["p@1,none"], results[task]["kl,none"]
        assert float(row["P@1"]["attrs"]["data-sort"]) == pytest.approx(p1, rel=1e-12)
        assert row["P@1"]["text"].startswith(fmt(p1, 3))
        assert float(row["KL (bits)"]["attrs"]["data-sort"]) == pytest.approx(kl / math.log(2), rel=1e-12)
        assert row["KL (bits)"]["text"].startswith(fmt(kl / math.log(2), 2))
        assert row["Depth"]["text"] == str(LAYERS)
        assert row["Items"]["text"] == "12"
        assert row["Model"]["text"] == EVIL_NAME
        assert row["Run"]["text"]  # the link to the run's provenance
    assert seen == set(TASKS)
    for dist in ("news", "wikipedia"):
        group = sorted((r for r in rows if r["Distribution"]["text"] == dist), key=lambda r: int(r["Rank"]["text"]))
        p1s = [results[f"jtc_{r['Projector']['text']}_{dist}"]["p@1,none"] for r in group]
        assert p1s == sorted(p1s, reverse=True)  # rank 1 has the highest layer-averaged P@1


def test_model_page_has_one_polyline_per_projector_in_every_chart(site):
    html = model_page(site)
    charts = html.split('<svg class="chart"')[1:]
    assert len(charts) == 3 * 2  # P@1, surprisal, KL for each of the two distributions
    for chart in charts:
        chart = chart.split("</svg>")[0]
        assert chart.count("<polyline") == 3
        for projector in ("id", "mat", "affine"):
            assert f'data-series="{projector}"' in chart
        assert chart.count("<circle") == 3 * LAYERS
        assert "relative depth" in chart
    assert html.count('<svg class="heatmap"') == 4  # r^2 and r^2w by (layer, projector) per distribution
    assert "Holm" in html and "α = 0.05" in html  # the family and level are stated


def test_strings_from_result_files_are_escaped(site):
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for page in site.glob("*.html"):
        html = page.read_text()
        assert EVIL_NAME not in html, page.name
        assert "<script>alert" not in html, page.name
        assert html.count("<script>") == 1, page.name  # the table-sorting script, nothing else
    assert escaped in (site / "index.html").read_text()
    assert escaped in model_page(site)
    assert escaped in (site / "runs.html").read_text()


def test_comparisons_equal_harness_stats_compare_on_the_samples(site, results_tree):
    data = json.loads((site / "comparisons.json").read_text())
    families = {(f["distribution"], f["metric"], f["a"], f["b"]): f for f in data["families"]}
    assert len(families) == 2 * len(COMPARED) * len(PAIRS)
    html = model_page(site)
    page_tables = [t for t in tables(html) if "comparison" in t["attrs"].get("class", "")]
    for dist in ("news", "wikipedia"):
        for metric in COMPARED:
            for a, b in PAIRS:
                ids_a, va = _samples(results_tree, f"jtc_{a}_{dist}")
                ids_b, vb = _samples(results_tree, f"jtc_{b}_{dist}")
                fam = families[(dist, metric, a, b)]
                assert fam["n_resamples"] == N_RESAMPLES  # a family of 3 layers needs no more
                expected = compare(ids_a, va[metric], ids_b, vb[metric], metric=metric, alpha=0.05,
                                   n_resamples=N_RESAMPLES, seed=0)
                assert fam["error"] is None
                assert [row for row in fam["layers"]] == [e.to_dict() for e in expected]
    # the page shows the same numbers (differences of natural-log metrics in bits)
    assert len(page_tables) == len(families)
    for table in page_tables:
        metric, a, b = table["attrs"]["data-metric"], table["attrs"]["data-a"], table["attrs"]["data-b"]
        factor = 1 / math.log(2) if metric in ("surprisal", "kl") else 1.0
        candidates = [f for (d, m, fa, fb), f in families.items() if (m, fa, fb) == (metric, a, b)]
        diffs = [float(row[4]["attrs"]["data-sort"]) for row in table["rows"][1:]]
        assert any(diffs == pytest.approx([r["diff"] * factor for r in f["layers"]], rel=1e-12) for f in candidates)
        for row in table["rows"][1:]:
            p_holm = float(row[7]["attrs"]["data-sort"])
            assert ("★" in row[8]["text"]) == (p_holm <= 0.05)


def test_malformed_and_partial_files_are_named_and_the_other_runs_still_render(results_tree, tmp_path):
    good = _copy_run(results_tree, tmp_path / "results" / "good")
    broken_dir = tmp_path / "results" / "broken"
    broken_dir.mkdir()
    text = _results_file(good).read_text()
    truncated = broken_dir / "results_2020-01-01T00-00-00.000000.json"
    truncated.write_text(text[: len(text) // 2])
    partial = _copy_run(good, tmp_path / "results" / "partial")
    partial_file = _results_file(partial)

    def drop_layer(data):
        del data["results"]["jtc_mat_news"]["kl.L1,none"]
        data["date"] -= 3600  # older, so its intact tasks do not replace the good run's

    _edit_results(partial_file, drop_layer)
    stderr = io.StringIO()
    out = tmp_path / "site"
    result = build_site([tmp_path / "results"], out, stream=stderr)
    messages = stderr.getvalue()
    assert str(truncated) in messages and "not valid JSON" in messages
    assert str(partial_file) in messages and "jtc_mat_news" in messages and "kl.L1,none" in messages
    index = (out / "index.html").read_text()
    assert 'id="warnings"' in index
    assert str(truncated) in index and str(partial_file) in index
    assert len(result.warnings) == 2
    rows = ranking_rows(index)
    assert len(rows) == len(TASKS)  # every task of the good run is still ranked
    assert (out / "transfer.html").exists() and (out / "runs.html").exists()
    # and the CLI reports the same problems, and fails only when nothing at all is usable
    assert jtc(["leaderboard", str(tmp_path / "results"), "-o", str(tmp_path / "site2")]) == 0
    assert jtc(["leaderboard", str(broken_dir), "-o", str(tmp_path / "site3")]) == 1
    assert "not valid JSON" in (tmp_path / "site3" / "index.html").read_text()


def test_mismatched_item_sets_are_an_error_for_that_comparison_only(results_tree, tmp_path):
    tree = _copy_run(results_tree, tmp_path / "run")
    (samples,) = glob.glob(str(tree / "**" / "samples_jtc_id_news_*.jsonl"), recursive=True)
    lines = Path(samples).read_text().splitlines()
    first = json.loads(lines[0])
    first["doc"]["item_id"] = "not-an-item-of-the-other-runs"
    Path(samples).write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    out = tmp_path / "site"
    stderr = io.StringIO()
    build_site([tree], out, stream=stderr)
    families = json.loads((out / "comparisons.json").read_text())["families"]
    for f in families:
        broken = f["distribution"] == "news" and "id" in (f["a"], f["b"])
        if broken:
            assert "different items" in f["error"] and samples in f["error"]
            assert f["layers"] == []
        else:
            assert f["error"] is None and len(f["layers"]) == LAYERS
    assert sum(f["error"] is not None for f in families) == len(COMPARED)  # mat vs id on news, per metric
    assert "different items" in stderr.getvalue()
    html = model_page(out)
    assert "not computed" in html and "not-an-item-of-the-other-runs" in html
    assert "different items" in (out / "index.html").read_text()


def test_the_newest_of_several_runs_is_kept_and_named(results_tree, tmp_path):
    old = _copy_run(results_tree, tmp_path / "results" / "old")
    new = _copy_run(results_tree, tmp_path / "results" / "new")

    def newer(data):
        data["date"] += 3600
        data["results"]["jtc_mat_news"]["p@1,none"] = 0.987654  # mark it, to see which run is shown

    _edit_results(_results_file(new), newer)
    out = tmp_path / "site"
    build_site([tmp_path / "results"], out, stream=io.StringIO())
    index = (out / "index.html").read_text()
    rows = ranking_rows(index)
    assert len(rows) == len(TASKS)
    (mat_news,) = [r for r in rows if r["Projector"]["text"] == "mat" and r["Distribution"]["text"] == "news"]
    assert float(mat_news["P@1"]["attrs"]["data-sort"]) == 0.987654
    assert 'id="superseded"' in index and index.count("superseded by the run of") == len(TASKS)
    assert str(_results_file(old)) in (out / "runs.html").read_text()


def test_transfer_page(site, results_tree, tmp_path):
    assert 'id="no-transfer"' in (site / "transfer.html").read_text()
    # A second copy stands in for a transfer run: its mat on wikipedia is recorded as fitted on news.
    tree = tmp_path / "results"
    _copy_run(results_tree, tree / "in-dist")
    transfer = _copy_run(results_tree, tree / "transfer")

    def fitted_on_news(data):
        data["configs"]["jtc_mat_wikipedia"]["metadata"]["provenance"]["projector_config"]["fit_on"] = "news"

    _edit_results(_results_file(transfer), fitted_on_news)
    out = tmp_path / "site"
    build_site([tree], out, stream=io.StringIO())
    html = (out / "transfer.html").read_text()
    assert 'id="no-transfer"' not in html
    (table,) = [t for t in tables(html) if t["attrs"].get("id") == "transfer-table"]
    assert len(table["rows"]) == 2
    cells = [c["text"] for c in table["rows"][1]]
    assert cells[1:4] == ["mat", "wikipedia", "news 60 items"]
    assert html.count('<svg class="chart"') == 3
    families = [f for f in json.loads((out / "comparisons.json").read_text())["families"] if "fit on news" in f["a"]]
    assert len(families) == len(COMPARED) and all(f["error"] is None for f in families)
    assert len(ranking_rows((out / "index.html").read_text())) == len(TASKS)  # transfer fits are not ranked


def test_pairwise_r2_keys_give_a_layer_to_layer_heatmap(results_tree, tmp_path):
    tree = _copy_run(results_tree, tmp_path / "run")

    def pairwise(data):
        res = data["results"]["jtc_mat_news"]
        for src in range(LAYERS):
            for dst in range(src + 1, LAYERS + 1):
                res[f"r2.L{src}.L{dst},none"] = 0.5 + 0.1 * (dst - src)

    _edit_results(_results_file(tree), pairwise)
    out = tmp_path / "site"
    build_site([tree], out, stream=io.StringIO())
    html = model_page(out)
    assert html.count('<svg class="heatmap"') == 5
    assert "from every layer l to every later layer" in html
    assert "r² = 0.8" in html  # r2.L0.L3


def test_cli_subcommand_builds_the_site(results_tree, tmp_path, capsys):
    assert jtc(["leaderboard", str(results_tree), "-o", str(tmp_path / "site")]) == 0
    assert str(tmp_path / "site" / "index.html") in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "site").iterdir())
    assert names[:2] == ["comparisons.json", "index.html"] and "runs.html" in names and "transfer.html" in names


def test_deep_families_get_enough_resamples_for_holm_to_reach_alpha():
    from jtc_lens.leaderboard.tables import resamples_for

    for layers in (3, 18, 30, 64):
        n = resamples_for(layers, 0.05, 2000)
        assert n >= 2000
        assert layers * 2 / (n + 1) <= 0.05  # the smallest sign-flip p-value survives Holm
    assert resamples_for(64, 0.05, 2000) > 2000


def test_custom_tasks_take_their_distribution_from_the_provenance(results_tree, tmp_path):
    tree = _copy_run(results_tree, tmp_path / "run")
    custom = "file:/data/<b>notes</b>.jsonl"

    def to_custom(data):
        # what lm-eval writes for `--tasks custom_jtc_mat --metadata '{"corpus": "file:..."}'`
        res = data["results"].pop("jtc_mat_news")
        data["results"]["custom_jtc_mat"] = {**res, "name": "custom_jtc_mat", "alias": "custom_jtc_mat"}
        config = data["configs"].pop("jtc_mat_news")
        config["metadata"].update(distribution=custom, fit_on=custom)
        config["metadata"]["provenance"]["distribution"] = custom
        config["metadata"]["provenance"]["projector_config"]["fit_on"] = custom
        data["configs"]["custom_jtc_mat"] = config

    results = _results_file(tree)
    _edit_results(results, to_custom)
    (samples,) = glob.glob(str(results.parent / "samples_jtc_mat_news_*.jsonl"))
    Path(samples).rename(samples.replace("samples_jtc_mat_news_", "samples_custom_jtc_mat_"))
    out = tmp_path / "site"
    result = build_site([tree], out, stream=io.StringIO())
    assert result.warnings == []
    rows = ranking_rows((out / "index.html").read_text())
    (row,) = [r for r in rows if r["Distribution"]["text"] == custom]
    assert row["Projector"]["text"] == "mat" and row["Rank"]["text"] == "1"
    assert "&lt;b&gt;notes&lt;/b&gt;" in model_page(out) and "<b>notes</b>" not in model_page(out)


def test_position_0_items_have_their_own_per_layer_tables_and_can_be_left_out_of_the_paired_tests(results_tree, tmp_path):
    tree = _copy_run(results_tree, tmp_path / "run")
    ids, _ = _samples(tree, "jtc_id_news")
    at0 = sorted(ids[:3])  # planted: three items recorded as scored at position 0 in every news task
    planted = {}

    def plant(data):
        for task, config in data["configs"].items():
            if not task.endswith("_news"):
                continue
            prov = config["metadata"]["provenance"]
            prov.update(items_at_position_0=3, items_at_position_0_ids=at0)
            planted[task] = {m: [0.01 * (l + 1) + k for l in range(LAYERS)] for k, m in enumerate(("p@1", "kl", "r2"))}
            prov["without_position_0"] = {"items": 9, "means": planted[task]}
            prov.pop("r2_by_layer_without_position_0", None)

    _edit_results(_results_file(tree), plant)
    default, without = tmp_path / "site", tmp_path / "site-no0"
    assert build_site([tree], default, stream=io.StringIO()).warnings == []
    assert build_site([tree], without, stream=io.StringIO(), without_position_0=True).warnings == []
    html = model_page(default)
    no0 = [t for t in tables(html) if "per-layer-table-no0" in t["attrs"].get("class", "")]
    assert {t["attrs"]["data-metric"] for t in no0} == {"p@1", "kl", "r2"}  # one per metric recorded, news only
    for table in no0:
        metric = table["attrs"]["data-metric"]
        header = [c["text"] for c in table["rows"][0]][1:]
        for l, row in enumerate(table["rows"][1:]):
            for projector, cell in zip(header, row[1:]):
                factor = 1 / math.log(2) if metric == "kl" else 1.0
                assert float(cell["attrs"]["data-sort"]) == pytest.approx(planted[f"jtc_{projector}_news"][metric][l] * factor)
    # the paired tests: every item by default, the items not at position 0 with the option
    for site, kept in ((default, None), (without, set(at0))):
        data = json.loads((site / "comparisons.json").read_text())
        assert data["without_position_0"] == (kept is not None)
        for fam in data["families"]:
            if fam["distribution"] != "news":
                continue
            ids_a, va = _samples(tree, f"jtc_{fam['a']}_news")
            ids_b, vb = _samples(tree, f"jtc_{fam['b']}_news")
            if kept:
                keep_a = [i not in kept for i in ids_a]
                keep_b = [i not in kept for i in ids_b]
                va = {m: {l: [v for v, k in zip(vals, keep_a) if k] for l, vals in by.items()} for m, by in va.items()}
                vb = {m: {l: [v for v, k in zip(vals, keep_b) if k] for l, vals in by.items()} for m, by in vb.items()}
                ids_a = [i for i, k in zip(ids_a, keep_a) if k]
                ids_b = [i for i, k in zip(ids_b, keep_b) if k]
            expected = compare(ids_a, va[fam["metric"]], ids_b, vb[fam["metric"]], metric=fam["metric"], alpha=0.05,
                               n_resamples=N_RESAMPLES, seed=0)
            assert fam["layers"] == [e.to_dict() for e in expected]
            assert fam["items"] == ("not at position 0" if kept else "all")
            assert all(row["n"] == (9 if kept else 12) for row in fam["layers"])
        if kept:
            # wikipedia's runs record their own list of position-0 items: its families run too
            assert all(f["error"] is None for f in data["families"])
