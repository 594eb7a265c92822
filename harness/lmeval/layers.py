"""``jtc_layers`` on lm-eval's hf model: checked before the weights load, installed on the loaded model for the
model object's whole life, so that every task (jtc or not, loglikelihood or generation) runs intervened."""

from __future__ import annotations

from ..layer_spec import LayerSpec, check_range, config_num_layers, parse_layer_spec
from ..options import default, parse_value

CONFIG_ARGUMENTS = ("revision", "subfolder", "gguf_file", "trust_remote_code")


def requested(kwargs: dict) -> tuple[LayerSpec | None, int]:
    """The spec in the model arguments (syntax checked; None when absent) and the seed a random order uses."""
    text = parse_value("jtc_layers", kwargs["jtc_layers"], "model_args") if "jtc_layers" in kwargs else None
    seed = parse_value("seed", kwargs["seed"], "model_args") if "seed" in kwargs else default("seed")
    return (parse_layer_spec(text) if text else None), seed


def _config(pretrained, kwargs: dict):
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)  # an already built model
    from transformers import AutoConfig

    extra = {k: kwargs[k] for k in CONFIG_ARGUMENTS if kwargs.get(k) not in (None, "")}
    return AutoConfig.from_pretrained(pretrained, **extra)


def check_before_load(args: tuple, kwargs: dict) -> None:
    """Refuse a bad ``jtc_layers`` before the model's weights are read: its syntax, then its range from the config."""
    spec, _seed = requested(kwargs)
    if spec is None:
        return
    pretrained = kwargs.get("pretrained", args[0] if args else None)
    if pretrained is None:
        return  # nothing to read the config from yet: the range is checked against the loaded blocks
    config = _config(pretrained, kwargs)
    num_layers = config_num_layers(config) if config is not None else None
    if num_layers:
        check_range(spec, num_layers)


def install(lm, kwargs: dict) -> None:
    """Put the requested intervention on ``lm.model`` for good; its record is ``record(lm)``."""
    spec, seed = requested(kwargs)
    if spec is None:
        return
    from ..layer_interventions import apply_layers

    # lm-eval's generate_until always asks for the KV cache: where it would be wrong, generate without it
    handle = apply_layers(lm.model, spec, seed, uncached_generate=True)
    lm._jtc_layers_handle = handle
    lm._jtc_layers = dict(handle.record)


def record(lm) -> dict | None:
    """What ``jtc_layers`` did to this lm-eval model (spec, program, order, seed), or None."""
    found = getattr(lm, "_jtc_layers", None)
    return dict(found) if found else None
