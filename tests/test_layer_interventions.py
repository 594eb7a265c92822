"""Layer interventions (jtc_layers) against hand-built reference models: each reference rearranges a deep copy's
block list itself (or calls the blocks by hand), never through the code under test."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import tiny
from jtc_lens.harness.layer_interventions import LayerInterventionError, active_record, intervened
from jtc_lens.harness.layer_spec import LayerSpecError, check_range, parse_layer_spec
from jtc_lens.harness.options import OptionError, parse_value

ARCHS = ("gpt2", "llama", "qwen2", "gemma3")
L = 6
S, F = "sliding_attention", "full_attention"
GEMMA_TYPES = [S, F, S, S, S, F]  # mixed: local rope and sliding mask vs global rope and full mask
TEXT = "The quick brown fox jumps over the lazy dog because it was late. A model reads hidden states"
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _built(arch):
    extra = {"layer_types": GEMMA_TYPES, "sliding_window": 3} if arch == "gemma3" else {}
    return tiny.build(arch, layers=L, **extra)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def model_of(arch):
    return _built(arch)[0]


def ids_of(arch, n=None):
    ids = _built(arch)[1](TEXT, return_tensors="pt")["input_ids"]
    return ids[:, :n] if n else ids


def block_holder(model):
    """(module holding the block list, attribute name): written out per family, independent of the code under test."""
    return (model.transformer, "h") if hasattr(model, "transformer") else (model.model, "layers")


def _types(model):
    return list(model.config.layer_types) if getattr(model.config, "layer_types", None) else None


def rearranged(model, order):
    """A deep copy whose blocks are ``order`` (original indices; a repeated block is copied again), each keeping its
    own layer type, with layer_idx set to its new position so that every block has a cache layer of its own type."""
    ref = copy.deepcopy(model)
    holder, name = block_holder(ref)
    old = list(getattr(holder, name))
    types = _types(model)
    new = [copy.deepcopy(old[j]) for j in order]
    for position, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    setattr(holder, name, nn.ModuleList(new))
    ref.config.num_hidden_layers = len(new)
    if types:
        ref.config.layer_types = [types[j] for j in order]
    return ref


class _ParallelSpan(nn.Module):
    """The paper's parallel span by hand: every block reads the same input with the arguments its own slot got in
    the unmodified model; the output is the mean of their outputs; ``k`` times in a row."""

    def __init__(self, blocks, calls, k):
        super().__init__()
        self.blocks, self.calls, self.k = nn.ModuleList(blocks), calls, k

    def forward(self, hidden, *args, **kwargs):
        for _ in range(self.k):
            outs = []
            for block, (a, kw) in zip(self.blocks, self.calls):
                if a:
                    outs.append(block(hidden, *a[1:], **kw))
                else:
                    outs.append(block(**{**kw, "hidden_states": hidden}))
            hidden = sum(outs) / len(outs)
        return hidden


def parallel_reference(model, ids, first, last, k):
    holder, name = block_holder(model)
    blocks = list(getattr(holder, name))
    calls = {}
    handles = [blocks[j].register_forward_pre_hook(
        lambda _m, a, kw, j=j: calls.__setitem__(j, (a, dict(kw))), with_kwargs=True) for j in range(first, last + 1)]
    try:
        model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ref = copy.deepcopy(model)
    rholder, _ = block_holder(ref)
    rblocks = list(getattr(rholder, name))
    span = _ParallelSpan(rblocks[first:last + 1], [calls[j] for j in range(first, last + 1)], k)
    setattr(rholder, name, nn.ModuleList(rblocks[:first] + [span] + rblocks[last + 1:]))
    ref.config.num_hidden_layers = L - (last - first)
    types = _types(model)
    if types:
        ref.config.layer_types = types[:first] + [types[first]] + types[last + 1:]
    return ref(ids, use_cache=False).logits


def expected_order(spec, seed=1234):
    import random

    kind, first, last = spec.kind, spec.first, spec.last
    span = list(range(first, last + 1))
    if kind == "skip":
        inner = []
    elif kind == "middle_repeat":
        inner = [(first + last) // 2] * len(span)
    elif kind == "reverse":
        inner = span[::-1]
    else:
        inner = list(span)
        random.Random(seed).shuffle(inner)
    return list(range(first)) + inner + list(range(last + 1, L))


SEQUENTIAL = ["skip:1:2", "skip:0:0", "skip:2:5", "middle_repeat:2:4", "middle_repeat:0:5", "reverse:1:4",
              "reverse:0:5", "random:0:5", "random:1:3"]
PARALLEL = ["parallel:1:3", "parallel:0:5", "looped_parallel:1:3:1", "looped_parallel:2:4:3"]


def state_of(model):
    holder, name = block_holder(model)
    blocks = list(getattr(holder, name))
    return ([("forward" in b.__dict__) for b in blocks], "generate" in model.__dict__,
            [m.layer_idx for b in blocks for m in b.modules() if hasattr(m, "layer_idx")])


# -- logits -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("text", SEQUENTIAL)
def test_sequential_kinds_match_a_rearranged_copy(arch, text):
    model, ids = model_of(arch), ids_of(arch)
    spec = parse_layer_spec(text)
    base = model(ids).logits
    reference = rearranged(model, expected_order(spec))(ids).logits
    with intervened(model, text) as record:
        got = model(ids).logits
    expected = expected_order(spec)
    assert record["order"] == expected[spec.first:len(expected) - (L - 1 - spec.last)]
    assert torch.allclose(got, reference, atol=ATOL, rtol=1e-5), float((got - reference).abs().max())
    assert not torch.allclose(got, base, atol=1e-3)
    assert torch.equal(model(ids).logits, base)


@torch.no_grad()
@pytest.mark.parametrize("text", PARALLEL)
def test_parallel_kinds_match_blocks_called_by_hand(arch, text):
    model, ids = model_of(arch), ids_of(arch)
    spec = parse_layer_spec(text)
    reference = parallel_reference(model, ids, spec.first, spec.last, spec.k or 1)
    with intervened(model, text) as record:
        got = model(ids).logits  # the cache on (a plain forward): loops after the first run without it
        off = model(ids, use_cache=False).logits
    assert record["program"] == [list(range(spec.first, spec.last + 1))] * (spec.k or 1)
    assert torch.allclose(got, reference, atol=ATOL, rtol=1e-5), float((got - reference).abs().max())
    assert torch.allclose(off, reference, atol=ATOL, rtol=1e-5)


def test_random_order_follows_the_seed_and_is_recorded():
    model = model_of("llama")
    with intervened(model, "random:0:5", seed=7) as a:
        pass
    with intervened(model, "random:0:5", seed=7) as b:
        pass
    with intervened(model, "random:0:5") as default_seed:
        pass
    assert a["order"] == b["order"] == expected_order(parse_layer_spec("random:0:5"), seed=7)
    assert sorted(a["order"]) == list(range(6)) and a["seed"] == 7 and default_seed["seed"] == 1234
    assert default_seed["order"] == expected_order(parse_layer_spec("random:0:5"))


@torch.no_grad()
def test_hooks_on_blocks_see_the_span_input_inside_the_span():
    model, ids = model_of("llama"), ids_of("llama")
    blocks = list(model.model.layers)
    seen = {}
    handles = [b.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out.clone())) for i, b in enumerate(blocks)]
    try:
        with intervened(model, "reverse:2:4") as record:
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert record["span_input_slots"] == [2, 3]
    assert torch.equal(seen[2], seen[1]) and torch.equal(seen[3], seen[1])  # deferred slots pass their input on
    assert torch.equal(out.hidden_states[3], seen[1]) and torch.equal(out.hidden_states[5], seen[4])


# -- the model afterwards -----------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("text", ["middle_repeat:1:4", "looped_parallel:1:3:2", "skip:0:1"])
def test_model_is_unmodified_afterwards_even_after_an_error(arch, text):
    model, ids = model_of(arch), ids_of(arch)
    before, base = state_of(model), model(ids).logits
    holder, name = block_holder(model)
    victim = list(getattr(holder, name))[5 if text.startswith("skip") else 2]  # inside the program where one runs
    child = next(iter(victim.children()))

    def boom(*_):
        raise RuntimeError("inside the forward")

    handle = child.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="inside the forward"):
            with intervened(model, text):
                assert state_of(model) != before
                model(ids)
    finally:
        handle.remove()
    assert state_of(model) == before and active_record(model) is None
    assert torch.equal(model(ids).logits, base)
    with intervened(model, text):
        model(ids)  # the intervention itself is reusable after the error
    assert state_of(model) == before


def test_a_second_intervention_on_the_same_blocks_is_refused():
    model = model_of("gpt2")
    with intervened(model, "skip:1:1"):
        with pytest.raises(LayerInterventionError, match="already run under layer intervention skip:1:1"):
            with intervened(model, "reverse:2:3"):
                pass
    assert active_record(model) is None


# -- generation with a KV cache ----------------------------------------------------------------------


def _generate(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


# every block runs once per token, or repeats write distinct cache layers of the repeated block's type
GENERATE_EXACT = {arch: ["skip:2:4", "reverse:1:4", "random:0:5", "middle_repeat:2:4"] for arch in ARCHS}
GENERATE_EXACT.update({a: GENERATE_EXACT[a] + ["middle_repeat:0:5", "skip:1:2", "skip:5:5"] for a in ("gpt2", "llama", "qwen2")})


@torch.no_grad()
@pytest.mark.parametrize("arch,text", [(a, t) for a, ts in GENERATE_EXACT.items() for t in ts])
def test_greedy_generation_with_a_cache_matches_the_rearranged_copy(arch, text):
    model, ids = model_of(arch), ids_of(arch, 8)
    reference = rearranged(model, expected_order(parse_layer_spec(text), seed=3))
    ref_seq, ref_logits = _generate(reference, ids, use_cache=True)
    with intervened(model, text, seed=3) as record:
        seq, logits = _generate(model, ids, use_cache=True)
    assert record["cache_with_past"] == "exact"
    assert torch.equal(seq, ref_seq)
    assert torch.allclose(logits, ref_logits, atol=ATOL, rtol=1e-5)


@torch.no_grad()
def test_parallel_generates_with_a_cache_as_without():
    model, ids = model_of("gemma3"), ids_of("gemma3", 8)
    with intervened(model, "parallel:1:4"):
        cached = _generate(model, ids, use_cache=True)
        uncached = _generate(model, ids, use_cache=False)
    assert torch.equal(cached[0], uncached[0]) and torch.allclose(cached[1], uncached[1], atol=ATOL)


REFUSED = [("gpt2", "looped_parallel:1:3:2", "runs 2 times per token"),
           ("gemma3", "skip:0:0", "layer 0 and the first layer of each attention type"),
           ("gemma3", "skip:1:2", "skipping block\\(s\\) \\[1\\]"),
           ("llama", "skip:0:2", "skipping block\\(s\\) \\[0\\]"),
           ("gemma3", "middle_repeat:0:5", "another attention type")]


@torch.no_grad()
@pytest.mark.parametrize("arch,text,why", REFUSED)
def test_cache_unsafe_generation_is_refused_and_runs_without_the_cache(arch, text, why):
    model, ids = model_of(arch), ids_of(arch, 8)
    with intervened(model, text) as record:
        assert record["cache_with_past"].startswith("refused")
        with pytest.raises(LayerInterventionError, match=f"cannot generate with a KV cache: .*{why}.*use_cache=False"):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        prefill = model(ids, use_cache=True)  # no past tokens: exact, the cache is written
        with pytest.raises(LayerInterventionError, match="holds past tokens"):
            model(ids[:, :1], cache=prefill.cache, use_cache=True)
        seq, _ = _generate(model, ids, use_cache=False)
    assert seq.shape[1] == ids.shape[1] + 6 and "generate" not in model.__dict__


@torch.no_grad()
def test_a_cache_filled_without_the_intervention_is_refused_where_it_matters():
    model, ids = model_of("llama"), ids_of("llama", 8)
    past = model(ids, use_cache=True).cache
    with intervened(model, "looped_parallel:1:2:2"):
        with pytest.raises(LayerInterventionError, match="holds past tokens"):
            model(ids[:, :1], cache=past, use_cache=True)


# -- bad specs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ("shuffle:1:2", "unknown kind 'shuffle'"),
    ("skip:3:1", "FIRST 3 is after LAST 1"),
    ("looped_parallel:1:2", "looped_parallel needs K"),
    ("parallel:1:2:3", "parallel takes no K"),
    ("looped_parallel:1:2:0", "K must be >= 1"),
    ("skip:1", "is not KIND:FIRST:LAST"),
    ("skip:-1:2", "not a whole number"),
])
def test_bad_specs_are_refused_without_torch_names_kinds(text, message):
    with pytest.raises(LayerSpecError, match=message) as info:
        parse_layer_spec(text)
    assert "skip, middle_repeat, reverse, random, parallel, looped_parallel" in str(info.value)
    with pytest.raises(OptionError, match="jtc_layers"):
        parse_value("jtc_layers", text)


def test_out_of_range_names_the_valid_range():
    with pytest.raises(LayerSpecError, match=r"has 6 blocks \(0\.\.5\)"):
        check_range(parse_layer_spec("reverse:2:6"), 6)
    with pytest.raises(LayerSpecError, match=r"0\.\.5"):
        with intervened(model_of("qwen2"), "skip:0:6"):
            pass
    assert parse_value("jtc_layers", " reverse:1:2 ") == "reverse:1:2" and parse_value("jtc_layers", "none") is None


def test_spec_syntax_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, jtc_lens.harness.layer_spec as s, jtc_lens.harness.options as o; "
            "o.parse_value('jtc_layers', 'looped_parallel:0:3:2'); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- lm-eval's hf model --------------------------------------------------------------------------------


@pytest.fixture
def hflm(tmp_path, monkeypatch):
    import lm_eval.models.huggingface as hf

    from jtc_lens.harness.lmeval import registration

    registration.patch_hf_model(hf)  # the import hook does it in an installed environment; idempotent
    model, tok = _built("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf, folder


def test_hf_model_refuses_a_bad_spec_before_loading_weights(hflm, monkeypatch):
    hf, folder = hflm
    import transformers

    def never(*_a, **_k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(LayerSpecError, match=r"0\.\.5"):
        hf.HFLM(pretrained=str(folder), jtc_layers="skip:4:6", device="cpu")
    with pytest.raises(OptionError, match="unknown kind"):
        hf.HFLM(pretrained=str(folder), jtc_layers="drop:1:2", device="cpu")


@torch.no_grad()
def test_hf_model_runs_every_request_intervened(hflm):
    hf, folder = hflm
    from jtc_lens.harness.lmeval import layers
    from jtc_lens.harness.lmeval.model import JTCHFLM
    from lm_eval.api.instance import Instance

    model = model_of("llama")
    ids = ids_of("llama")
    reference = rearranged(model, expected_order(parse_layer_spec("skip:1:2")))
    for cls in (hf.HFLM, JTCHFLM):
        lm = cls(pretrained=str(folder), jtc_layers="skip:1:2", seed="5", device="cpu", dtype="float32", batch_size=2)
        record = layers.record(lm)
        assert record["spec"] == "skip:1:2" and record["order"] == [] and record["num_layers"] == L
        assert torch.allclose(lm._model_call(ids), reference(ids).logits, atol=ATOL)
        requests = [Instance("loglikelihood", {}, ("The quick brown", " fox jumps"), 0),
                    Instance("loglikelihood", {}, ("A model reads", " hidden states"), 0)]
        got = [ll for ll, _ in lm.loglikelihood(requests)]
        want = []
        for ctx, cont in (r.args for r in requests):
            c, w = lm._encode_pair(ctx, cont)
            logp = torch.log_softmax(reference(torch.tensor([c + w])).logits[0, :-1], -1)
            want.append(float(sum(logp[len(c) - 1 + i, t] for i, t in enumerate(w))))
        assert got == pytest.approx(want, abs=1e-4)
    plain = hf.HFLM(pretrained=str(folder), device="cpu", dtype="float32")
    assert layers.record(plain) is None
    assert torch.allclose(plain._model_call(ids), model(ids).logits, atol=ATOL)


@torch.no_grad()
def test_hf_model_generates_without_the_cache_where_the_cache_would_be_wrong(hflm):
    hf, folder = hflm
    from jtc_lens.harness.lmeval import layers

    text = "looped_parallel:1:3:2"
    lm = hf.HFLM(pretrained=str(folder), jtc_layers=text, device="cpu", dtype="float32")
    assert layers.record(lm)["generate"] == "without the KV cache"
    context = torch.tensor([lm.tok_encode("The quick brown fox")])
    got = lm._model_generate(context, max_length=context.shape[1] + 5, stop=[])[0]  # lm-eval asks for the cache
    expected = context[0].tolist()
    for _ in range(5):  # greedy decoding over the hand-built parallel span, the whole sequence every step
        logits = parallel_reference(model_of("llama"), torch.tensor([expected]), 1, 3, 2)
        expected.append(int(logits[0, -1].argmax()))
    assert len(got) > context.shape[1] and got.tolist() == expected[:len(got)]


def test_fingerprint_and_cache_key_carry_the_intervention():
    from jtc_lens.harness.fitting import model_key
    from jtc_lens.harness.models import build_lens_model

    model, tok = _built("gpt2")
    lens = build_lens_model(model, tok)
    plain = lens.fingerprint()
    with intervened(model, "reverse:1:3") as record:
        lens_under = build_lens_model(model, tok)  # the forward-pass check holds under the intervention
        changed = lens_under.fingerprint()
    assert changed["layers"] == record and changed["id"] != plain["id"]
    assert model_key(changed) != model_key(plain) and "layers" not in plain
