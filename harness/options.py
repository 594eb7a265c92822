"""Every option of a jtc run, defined once: name, default, allowed values and meaning.

The task defaults, the options accepted in ``--model_args``, the ``jtc sweep`` and ``jtc tuned export``
flags and the tuned recipe's defaults are all derived from ``OPTIONS``. Values arrive as text (model
arguments, command-line flags) or JSON (``--metadata``); ``parse_options`` turns them into typed values
and refuses anything else with a message naming the option, the value and what is allowed.
Nothing here imports torch: the options are checked before any model is loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

PROJECTORS = ("id", "mat", "affine", "tuned")
FITTED = ("mat", "affine", "tuned")  # projectors that learn from data
LEAST_SQUARES = {"mat": False, "affine": True}  # name -> fitted with an intercept
PROTOCOLS = ("paper", "dense")
RECIPES = ("tuned-lens", "warm")
WARM_STARTS = ("affine", "stream")
# Keys a task sets for itself (task YAMLs and the task class) or lm-eval adds to every task's metadata
# (config_source: the YAML it was read from), not options a user passes.
TASK_KEYS = ("projector", "distribution", "analysis", "part", "custom", "version", "provenance", "config_source")


class OptionError(ValueError):
    """An option has a value outside what it allows, or is not an option at all."""


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]  # raises ValueError on a value it does not allow
    allowed: str  # what ``parse`` accepts, said for a person
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _none_words(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _integer(value) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a count")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)
    if isinstance(value, int):
        return value
    return int(str(value).strip())


def _number(convert, check, *, words: dict | None = None, optional: bool = False):
    """A parser for a number: none (when ``optional``) or one of ``words`` as given, else ``convert`` then ``check``."""
    words = words or {}

    def parse(value):
        if optional and _none_words(value):
            return None
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        x = convert(value)
        check(x)
        return x
    return parse


def _int(minimum: int, *, words: dict | None = None, optional: bool = False):
    def check(n):
        if n < minimum:
            raise ValueError(f"below {minimum}")
    return _number(_integer, check, words=words, optional=optional)


def _real(value) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return x


def _float(minimum: float, *, optional: bool = False, words: dict | None = None, strict: bool = False):
    def check(x):
        if x < minimum or (strict and x == minimum):
            raise ValueError(f"{'at or ' if strict else ''}below {minimum}")
    return _number(_real, check, words=words, optional=optional)


def _choice(*values: str):
    def parse(value):
        text = str(value).strip()
        if text not in values:
            raise ValueError("not one of the choices")
        return text
    return parse


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError("not a boolean")


def _text(*, optional: bool = True):
    def parse(value):
        if optional and _none_words(value):
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError("not a non-empty string")
        return value.strip()
    return parse


def _distribution(value):
    """A registered distribution, ``file:PATH`` or ``hf:NAME[:CONFIG]``; None means the evaluated one."""
    if _none_words(value):
        return None
    text = str(value).strip()
    if text.startswith(("file:", "hf:")):
        if len(text.split(":", 1)[1]) == 0:
            raise ValueError("names no file or dataset")
        return text
    from .corpora import names  # light: the registry, no corpus is read

    if text not in names():
        raise ValueError("not a registered distribution")
    return text


def _layers(value):
    """A layer intervention spec (harness/layer_spec.py), as its canonical text; None: the model as it is."""
    if _none_words(value):
        return None
    from .layer_spec import parse_layer_spec  # torch-free

    return parse_layer_spec(value).text


def _distribution_allowed() -> str:
    return "a registered distribution (jtc corpora list), file:PATH or hf:NAME[:CONFIG]"


OPTIONS: tuple[Option, ...] = (
    Option("split", "validation", _choice("validation", "test"), "validation or test", "evaluation split"),
    Option("protocol", "paper", _choice(*PROTOCOLS), " or ".join(PROTOCOLS),
           "paper: one seeded random position per sentence; dense: every position of chunk_len-token chunks"),
    Option("seed", 1234, _int(0), "an integer >= 0", "document splits, item order and positions"),
    Option("n_eval", 3000, _int(1, words={"all": None}), "an integer >= 1, or all", "evaluation items (a seeded prefix)"),
    Option("n_fit", 9000, _int(1), "an integer >= 1", "fit items (train split) for mat / affine"),
    Option("fit_on", None, _distribution, _distribution_allowed(),
           "fit on another distribution (transfer); default: the evaluated one"),
    Option("corpus", None, _distribution, _distribution_allowed(), "custom_jtc_* tasks: the distribution to evaluate"),
    Option("pairs", "last", _choice("last", "all"), "last or all",
           "all: fit mat / affine for every pair l < l' (the paper's heatmap); last: only l -> L"),
    Option("ridge", 0.0, _float(0.0, words={"auto": "auto"}), "a number >= 0, or auto",
           "mat / affine: ridge penalty, relative to the mean diagonal of the Gram matrix; auto picks it on held-out fit data"),
    Option("chunk_len", 128, _int(2), "an integer >= 2", "dense protocol: chunk length in tokens"),
    Option("stride", None, _int(1, optional=True), "an integer >= 1, or none",
           "dense protocol: score only the last `stride` positions of each chunk"),
    Option("position_draw", "with_next", _choice("with_next", "all"), "with_next or all",
           "paper protocol: draw the scored position among tokens that have a next token (with_next), or among all (all)"),
    Option("on_nonfinite", "error", _choice("error", "drop"), "error or drop",
           "non-finite hidden states or logits: stop the run (error) or drop those items and record them (drop)"),
    Option("submodule_every", 1, _int(1), "an integer >= 1",
           "jtc_submodule_* tasks: intervene from every k-th start layer (0, k, 2k, ...); 1: every layer"),
    Option("jtc_layers", None, _layers,
           "none, or KIND:FIRST:LAST[:K] with KIND skip, middle_repeat, reverse, random, parallel or looped_parallel (K loops, only there)",
           "run the model with blocks FIRST..LAST (0-based, inclusive) skipped, repeated, reordered or run in parallel "
           "(Sun et al. 2024), for every task; random draws its order from seed"),
    Option("layers_every", 1, _int(1), "an integer >= 1",
           "jtc_layers_* tasks: intervene on the middle spans [s, L-1-s] for every k-th start s (1, 1+k, ...); 1: every span"),
    Option("jtc_batch_size", 16, _int(1), "an integer >= 1", "items per forward pass"),
    Option("recipe", "warm", _choice(*RECIPES), " or ".join(RECIPES),
           "tuned lens: the published recipe (tuned-lens, zero start) or the least-squares warm start (warm)"),
    Option("token_budget", 16384, _int(1), "an integer >= 1", "tuned lens: training tokens"),
    Option("tokens_per_step", 1024, _int(1), "an integer >= 1", "tuned lens: tokens per SGD step"),
    Option("tuned_chunk_len", 256, _int(2), "an integer >= 2", "tuned lens: chunk length (documents joined with EOS)"),
    Option("warm_start", "affine", _choice(*WARM_STARTS), " or ".join(WARM_STARTS),
           "tuned lens, warm: start from the run's affine projector (n_fit items; keep-best on the train items after them) "
           "or from an affine fit on the stream (stream: keep-best on held-out stream chunks)"),
    Option("warm_fit_tokens", 8192, _int(1), "an integer >= 1",
           "tuned lens, warm: tokens of the stream for the step's preconditioner (and, with warm_start=stream, the affine "
           "start); counted in the budget"),
    Option("tuned_loss", "kl", _choice("kl", "xent"), "kl or xent",
           "tuned lens: KL to the model's output (kl) or cross-entropy to the next token (xent)"),
    Option("stop_at", None, _float(0.0, optional=True, strict=True), "a number > 0, or none",
           "tuned lens: stop once the mean loss reaches this many nats"),
    Option("tuned_lens_path", None, _text(), "a folder, or none",
           "evaluate a lens saved by the tuned-lens package (config.json + params.pt) instead of training one"),
    Option("allow_unverified_lens", False, _bool, "true or false",
           "tuned_lens_path: accept a lens that carries no hash of the unembedding it was trained for"),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def default(name: str):
    return BY_NAME[name].default


def defaults() -> dict:
    return {o.name: o.default for o in OPTIONS}


def parse_value(name: str, value, where: str = "") -> Any:
    option = BY_NAME[name]
    try:
        return option.parse(value)
    except (ValueError, TypeError) as exc:
        prefix = f"{where}: " if where else ""
        raise OptionError(f"{prefix}option {name}={value!r} is not allowed ({exc}); {name} takes {option.allowed}") from None


def unknown_message(key: str, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    close = difflib.get_close_matches(key, NAMES, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{prefix}unknown option {key!r}{hint}; valid options: {', '.join(NAMES)}"


def parse_options(values: dict, *, ignore: Iterable[str] = (), where: str = "") -> dict:
    """Every option, typed: the given values over the defaults. A key that is neither an option, a task key
    nor in ``ignore`` (e.g. arguments meant for the model) is refused."""
    ignore = set(ignore) | set(TASK_KEYS)
    for key in values:
        if key not in BY_NAME and key not in ignore:
            raise OptionError(unknown_message(key, where))
    out = defaults()
    for key, value in values.items():
        if key in BY_NAME:
            out[key] = parse_value(key, value, where)
    return out


def likely_misspelled(keys: Iterable[str], known: Iterable[str] = ()) -> list[str]:
    """Keys that are not options nor ``known``, yet close to an option's name: almost certainly typos."""
    known = set(known) | set(TASK_KEYS)
    return [k for k in keys if k not in BY_NAME and k not in known and difflib.get_close_matches(k, NAMES, n=1, cutoff=0.75)]


def check_known(values: dict, where: str = "") -> dict:
    """Refuse unknown keys and bad values of a dict that holds jtc options only; the typed values."""
    return parse_options(values, where=where)


def add_flags(parser, names: Iterable[str], *, typed: bool = False) -> None:
    """argparse flags for the named options (``--n-eval``...), checked by the schema so that a bad value gets the
    same message everywhere. ``typed``: the flag gives the parsed value and defaults to the option's default;
    otherwise it gives the text as written (to pass on to lm_eval) and None when omitted."""
    import argparse

    for name in names:
        option = BY_NAME[name]

        def check(value, _name=name):
            try:
                parsed = parse_value(_name, value)
            except OptionError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            return parsed if typed else value

        parser.add_argument(option.flag, dest=name, type=check, default=option.default if typed else None,
                            help=f"{option.help} ({option.allowed}; default {option.default})")


def markdown_table() -> str:
    """The README's table of options."""
    def shown(value):
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.name}` | {shown(o.default)} | {o.allowed} | {o.help} |" for o in OPTIONS]
    return "\n".join(rows)
