"""Static HTML leaderboard of jtc-lens results: rankings, per-layer charts, paired tests, transfer, provenance.

``jtc leaderboard RESULTS_DIR... -o SITE_DIR`` (or ``leaderboard.build.build_site``) reads lm-eval output
folders and writes self-contained pages that open from file://.
"""
