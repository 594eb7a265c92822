"""jtc-lens: a benchmark of projectors that read transformers' intermediate hidden states."""

__version__ = "0.1.0"
