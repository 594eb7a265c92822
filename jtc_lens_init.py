"""jtc-lens: a benchmark of projectors that read transformers' intermediate hidden states, as an
lm-evaluation-harness plugin. Installed as jtc_lens.harness (evaluation), jtc_lens.leaderboard (analysis)
and jtc_lens.tasks (the lm-eval task YAMLs)."""
