import os

import pytest
import torch

from loradrift.config import ModelConfig
from loradrift.layout import model_key
from loradrift.models import ModelError, build_task_model, describe, pool, resolve_model_dir
from loradrift.tasks import get_task


def test_pooling_by_hand():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "last"), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    assert torch.equal(pool(h, mask, "first"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    assert torch.allclose(pool(h, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))


def test_tiny_model_is_deterministic_and_described():
    mcfg = ModelConfig(name="tiny")
    d = resolve_model_dir(mcfg)
    info = describe(d)
    assert info["layers"] == 2 and info["hidden_size"] == 64 and info["decoder"]
    assert model_key(mcfg) == model_key(ModelConfig(name="tiny")) != model_key(ModelConfig(name="tiny", tiny={"num_hidden_layers": 3}))


def test_padding_does_not_change_the_pooled_vector():
    """Right padding + last-token pooling: a padded example's vector equals the unpadded one."""
    mcfg = ModelConfig(name="tiny")
    m = build_task_model(resolve_model_dir(mcfg), get_task("sst2"), mcfg, head_seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 3, 3]])
    with torch.no_grad():
        a = m({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
        b = m({"input_ids": padded, "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])})["logits"]
    assert torch.allclose(a, b, atol=1e-6)


def test_qa_head_loss_uses_span_only_on_answerable_windows():
    mcfg = ModelConfig(name="tiny")
    m = build_task_model(resolve_model_dir(mcfg), get_task("squad_v2"), mcfg, head_seed=0)
    ids = torch.randint(4, 100, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 0]),
             "start_positions": torch.tensor([3, -100]), "end_positions": torch.tensor([5, -100])}
    out = m(batch)
    assert out["start_logits"].shape == (2, 10) and out["has_logit"].shape == (2,)
    only_has = torch.nn.functional.binary_cross_entropy_with_logits(out["has_logit"], torch.tensor([1.0, 0.0]))
    span = (torch.nn.functional.cross_entropy(out["start_logits"][:1], torch.tensor([3]))
            + torch.nn.functional.cross_entropy(out["end_logits"][:1], torch.tensor([5]))) / 2
    assert torch.allclose(out["loss"], only_has + span)


def test_same_seed_same_head_init():
    mcfg = ModelConfig(name="tiny")
    d = resolve_model_dir(mcfg)
    a = build_task_model(d, get_task("rte"), mcfg, head_seed=7)
    b = build_task_model(d, get_task("rte"), mcfg, head_seed=7)
    c = build_task_model(d, get_task("rte"), mcfg, head_seed=8)
    assert torch.equal(a.head.proj.weight, b.head.proj.weight)
    assert not torch.equal(a.head.proj.weight, c.head.proj.weight)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_dir(ModelConfig(name=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(ModelConfig(name=str(tmp_path / "empty")))


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.setenv("LORADRIFT_CACHE", os.environ["LORADRIFT_REAL_CACHE"])


@pytest.mark.slow
def test_smollm2_offline_info_and_both_heads(real_cache):
    """The real SmolLM2-135M from the PyPI wheel (no model hub): architecture and a forward pass
    of the classifier and the SQuAD head on CPU."""
    mcfg = ModelConfig(name="smollm2-135m")
    d = resolve_model_dir(mcfg)
    info = describe(d)
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (30, 576, 49152)
    assert 134_000_000 < info["parameters"] < 136_000_000
    from loradrift.models import load_tokenizer

    tok = load_tokenizer(d, True)
    enc = tok(["a fine film", "what a mess of a movie"], padding=True, return_tensors="pt")
    for task in ("sst2", "squad_v2"):
        m = build_task_model(d, get_task(task), mcfg, head_seed=0).eval()
        with torch.no_grad():
            out = m({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.slow
def test_minilm_encoder_classifier(real_cache):
    mcfg = ModelConfig(name="minilm-l6")
    d = resolve_model_dir(mcfg)
    assert describe(d)["decoder"] is False
    m = build_task_model(d, get_task("mrpc"), mcfg, head_seed=0).eval()
    assert m.pooling == "first"
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        assert m({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"].shape == (1, 2)
