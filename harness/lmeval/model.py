"""``--model jtc-hf``: the model that lm-eval's plugin discovery loads from the ``lm_eval.models`` entry point.

lm-eval releases that read that entry point (EleutherAI/lm-evaluation-harness#4013) register its value as
a lazy placeholder, load it when ``--model jtc-hf`` is asked for, and call ``create_from_arg_string`` on
what they get: it must be an ``LM`` subclass. This one is lm-eval's own hf model that also takes jtc
options in ``--model_args`` (``jtc_layers`` among them) and splits items over CPU processes under accelerate, so it works whether or
not the import hook (which does the same to ``hf``) is active.
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM

from . import layers
from .registration import _without_jtc_options, after_hf_init


class JTCHFLM(HFLM):
    def __init__(self, *args, **kwargs):
        layers.check_before_load(args, kwargs)
        super().__init__(*args, **_without_jtc_options(kwargs))
        after_hf_init(self, kwargs)
