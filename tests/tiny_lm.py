"""Tiny language models built in code for the tests: no download, seconds to build."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def bpe_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (pad and bos tokens; pseudo-words split
    into several pieces)."""
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


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config: Any
) -> LlamaForCausalLM:
    """A randomly initialised Llama (2 heads) wired to the tokenizer's special tokens, in eval
    mode; `config` sets the sizes (and any other LlamaConfig field)."""
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
