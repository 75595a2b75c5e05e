"""Per-example fine-tuning: the naive reference and the batched engine."""

from datafluence.finetune.batched import BatchedFinetuner
from datafluence.finetune.lora import LoRAFinetuner
from datafluence.finetune.naive import finetune_copy, measure
from datafluence.finetune.recipe import FinetuneRecipe

__all__ = ["BatchedFinetuner", "LoRAFinetuner", "FinetuneRecipe", "finetune_copy", "measure"]
