"""The run logger driven by a real Hugging Face Trainer: the logged curriculum and losses
must equal a plain-loop replay of the same batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from datafluence.simfluence import RunLogger, trainer_callback  # noqa: E402
from datafluence.tasks import ClassificationTask  # noqa: E402


class Net(nn.Module):
    """Returns logits, or the Trainer's {"loss", "logits"} when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.lin(x)
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_trainer_callback_logs_what_a_plain_loop_replays(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    pool = [{"x": x[i], "labels": int(y[i]), "simfluence_id": i} for i in range(24)]
    task = ClassificationTask(num_classes=3)
    test = task.examples(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    model = Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    logger = RunLogger(test, task, model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=5,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=1,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=pool,
        data_collator=logger.wrap_collator(transformers.default_data_collator),
        callbacks=[trainer_callback(logger)],
    )
    trainer.train()
    curriculum, losses = logger.arrays()
    assert curriculum.shape == (5, 4) and losses.shape == (6, 5)

    replay = Net()
    replay.load_state_dict(start)
    opt = torch.optim.SGD(replay.parameters(), lr=0.1)
    with torch.no_grad():
        expected = [task.loss(replay, test.tensors).numpy()]
    for ids in curriculum:
        opt.zero_grad()
        F.cross_entropy(replay(x[ids]), y[ids]).backward()
        opt.step()
        with torch.no_grad():
            expected.append(task.loss(replay, test.tensors).numpy())
    np.testing.assert_allclose(losses, np.stack(expected), rtol=1e-5, atol=1e-6)
    assert len(set(curriculum.ravel().tolist())) > 4  # really different examples
