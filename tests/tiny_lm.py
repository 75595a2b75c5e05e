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
