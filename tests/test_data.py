"""`datafluence.data.examples`: Datasets, DataLoaders, Hugging Face datasets and lists become
Examples, once per call, with clear errors naming the item and the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import datafluence as dfl
from datafluence.data import examples


class Counted(Dataset):
    """(x, y) items that count how often they are read."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n,), generator=gen)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


def test_tuple_dataset_and_dataloader_give_the_same_examples_read_once():
    data = Counted()
    ex = examples(data)
    assert data.reads == len(data)  # one pass, one item at a time
    assert ex.ids == tuple(str(i) for i in range(6))
    assert torch.equal(ex.tensors["x"], data.x) and torch.equal(ex.tensors["y"], data.y)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    again = examples(loader)  # the loader's dataset, in order: shuffling changes nothing
    assert again.ids == ex.ids and torch.equal(again.tensors["x"], ex.tensors["x"])
    tensors = examples(TensorDataset(data.x, data.y))
    assert torch.equal(tensors.tensors["y"], data.y)


def test_dict_items_lists_and_ids():
    items = [
        {"id": f"a{i}", "input": np.full(2, i, dtype=np.float32), "mask": [1, 0], "y": i % 2}
        for i in range(4)
    ]
    ex = examples(items)
    assert ex.ids == ("a0", "a1", "a2", "a3")
    assert set(ex.tensors) == {"input", "mask", "y"}  # several tensors per example
    assert ex.tensors["input"].shape == (4, 2) and ex.tensors["y"].tolist() == [0, 1, 0, 1]


def test_hugging_face_dataset_plain_and_torch_format():
    hf = pytest.importorskip("datasets")
    ds = hf.Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], "y": [0, 1, 1]})
    plain = examples(ds)
    ds.set_format("torch")
    formatted = examples(ds)
    assert torch.equal(plain.tensors["x"].float(), formatted.tensors["x"].float())
    assert formatted.tensors["y"].tolist() == [0, 1, 1]


def test_texts_for_a_causal_lm_task():
    from tiny_lm import CharTokenizer

    task = dfl.CausalLMTask(CharTokenizer())
    rows = [{"id": "p", "prompt": "ab", "completion": " cd"}, {"text": "bad", "id": "t"}]
    ex = examples(rows, task)
    assert ex.ids == ("p", "t") and ex.items == (("ab", " cd"), "bad")
    same = task.examples([("ab", " cd"), "bad"], ids=["p", "t"])
    assert torch.equal(ex.tensors["input_ids"], same.tensors["input_ids"])
    with pytest.raises(ValueError, match="item 1 needs a 'text' field"):
        examples([{"text": "ab"}, {"words": "cd"}], task)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([{"x": [1.0, 2.0], "y": 0}, {"x": [1.0], "y": 1}], ValueError, "item 1 field 'x'.*shape"),
        ([{"x": [1.0], "y": 0}, {"x": [2.0]}], ValueError, "item 1 has fields \\['x'\\]"),
        ([{"x": "a cat", "y": 0}], TypeError, "item 0 field 'x' is a string"),
        ([{"x": object(), "y": 0}], TypeError, "item 0 field 'x'"),
        ([3, 4], TypeError, "item 0 is a int"),
        ([], ValueError, "empty"),
        ("some text", TypeError, "collection of examples"),
        (iter([1, 2]), TypeError, "cannot read examples"),
        ([{"id": "a", "x": [1.0]}, {"id": "a", "x": [2.0]}], ValueError, "not unique"),
    ],
)
def test_bad_items_are_named(data, error, match):
    with pytest.raises(error, match=match):
        examples(data, role="training")


def test_every_method_takes_a_dataloader_and_gives_what_examples_give():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    task = dfl.ClassificationTask()
    train, queries = Counted(6, 0), Counted(3, 1)
    direct = dfl.InfluenceFunction(task, "ekfac", progress=False).score(
        model, examples(train), examples(queries)
    )
    loaded = dfl.InfluenceFunction(task, "ekfac", progress=False).score(
        model, DataLoader(train, batch_size=2), list(queries)
    )
    np.testing.assert_array_equal(loaded.values, direct.values)
    own = dfl.GradientSimilarity(task, progress=False).self_score(model, DataLoader(train))
    assert own.shape == (6, 1)


def test_train_and_query_fields_must_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3)).double()
    task = dfl.ClassificationTask()
    train = examples(Counted(4))
    other = dfl.Examples({**examples(Counted(2)).tensors, "w": torch.ones(2)}, ("a", "b"))
    with pytest.raises(ValueError, match="different fields.*same keys"):
        dfl.GradientSimilarity(task, progress=False).score(model, train, other)
