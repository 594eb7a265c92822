"""Tiny random models of every supported architecture, with a tokenizer trained here on a few sentences."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog because it was late.",
    "A model reads hidden states layer by layer and predicts the next token.",
    "Wikipedia is a free online encyclopedia written by volunteers around the world.",
    "The news reported that markets rose sharply on Monday after the announcement.",
    "She said that the results of the experiment were surprising and new.",
    "In 1998 the company opened a factory in the north of the country.",
]
ARCHS = ("gpt2", "llama", "qwen2", "gemma3", "gptneox", "bert")


@functools.lru_cache(maxsize=None)
def tokenizer(masked: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]")) if masked else Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if masked else pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if masked else ["<pad>", "<unk>", "<bos>", "<eos>"]
    trainer_cls = trainers.WordPieceTrainer if masked else trainers.BpeTrainer
    kwargs = {} if masked else {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer_cls(vocab_size=400, special_tokens=specials, **kwargs))
    if masked:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def build(arch: str, layers: int = 3, d: int = 32, seed: int = 0, **config):
    """(model, tokenizer) for ``arch``, randomly initialised under ``seed``, in float32 eval mode; ``config``:
    further config fields (e.g. Gemma 3's ``layer_types``)."""
    torch.manual_seed(seed)
    tok = tokenizer(masked=arch == "bert")
    v = len(tok)
    common = dict(vocab_size=v, **config)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_positions=256, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=256, **common))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **{"sliding_window": 16, **common}))
    elif arch == "gptneox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
                                                 max_position_embeddings=256, **common))
    elif arch == "bert":
        model = BertForMaskedLM(BertConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
                                           max_position_embeddings=256, **common))
    else:
        raise ValueError(arch)
    return model.float().eval(), tok
