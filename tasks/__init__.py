"""The lm-eval task YAMLs of jtc-lens (a package so that lm-eval's plugin discovery can find this folder)."""
