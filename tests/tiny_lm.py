"""Tiny language models built in code for the tests: no download, seconds to build."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# tokenizers / transformers are imported inside the builders, so that test modules can import
# this one before pytest.importorskip("transformers") has run


class CharTokenizer:
    """One token per character; 0 = pad, 1 = start."""

    pad_token_id, bos_token_id, eos_token_id, name_or_path = 0, 1, 1, "chars"
    alphabet = "abcdefgh "

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + self.alphabet.index(c) for c in text]}

    def __len__(self) -> int:
        return 2 + len(self.alphabet)


def bpe_tokenizer(corpus: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `corpus` (pad and bos tokens; pseudo-words split
    into several pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


def tiny_llama(tokenizer: Any, seed: int = 0, **config: Any) -> Any:
    """A randomly initialised Llama (2 heads) wired to the tokenizer's special tokens, in eval
    mode; `config` sets the sizes (and any other LlamaConfig field)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.bos_token_id,
            **config,
        )
    ).eval()


# The small models several LM test modules share (tests/methods/test_lm.py, prefix packing).
CORPUS = [
    "a wug is a blicket. all blickets have a dax. in winter, frogs hibernate in the mud.",
    "every cat is an animal. the dog causes the rain. a bird has a nest.",
]


def llama(tokenizer, dtype=torch.float32) -> Any:
    return tiny_llama(
        tokenizer,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=128,
    ).to(dtype)


def gpt2(tokenizer) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def char_gpt2(n_layer: int = 1, seed: int = 0) -> Any:
    """A randomly initialised float64 GPT-2 (8-wide, 2 heads) for `CharTokenizer`, in eval
    mode (so its dropout settings never act)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=len(CharTokenizer()),
        n_positions=16,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).double().eval()
