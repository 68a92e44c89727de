"""Forgetting (Δloss with the base LM head) and the drift-Δloss rank correlation."""

import json
import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, base model folder, out folder): the tiny model first trained briefly as a language
    model on the forgetting text, so that it has something to forget (a random-init model's loss
    is already that of a uniform guess, which noise does not raise)."""
    from loradrift.config import resolve_config
    from loradrift.forgetting import general_text, tokenize
    from loradrift.models import load_backbone, load_tokenizer, resolve_model_dir

    out = tmp_path_factory.mktemp("forget")
    overrides = ["forgetting.n_paragraphs=6", "forgetting.max_tokens=24"]
    cfg = resolve_config(preset="tiny", out_dir=out, overrides=overrides)
    tiny_dir = resolve_model_dir(cfg.model)
    tok = load_tokenizer(tiny_dir, True)
    seqs = tokenize(tok, general_text(cfg)[0], 24)
    ids = torch.tensor([s + [tok.pad_token_id] * (24 - len(s)) for s in seqs])
    torch.manual_seed(0)
    model = load_backbone(tiny_dir, True, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    base_dir = out / "base_lm"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = resolve_config(preset="tiny", out_dir=out, overrides=[*overrides, f"model.name={base_dir}"])
    return cfg, resolve_model_dir(cfg.model), out


def _base(model_dir):
    from loradrift.models import load_backbone

    return load_backbone(model_dir, True, torch.float32)


def _full_run(out, name, model):
    rd = out / "runs" / name
    model.save_pretrained(rd / "model")
    (rd / "result.json").write_text(json.dumps({"name": name}))
    return rd


def _lora_run(out, name, model_dir, noise=0.0):
    from peft import LoraConfig, get_peft_model

    from loradrift.config import ALL_LORA_TARGETS

    rd = out / "runs" / name
    peft = get_peft_model(_base(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LORA_TARGETS))
    if noise:
        g = torch.Generator().manual_seed(1)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.data = noise * torch.randn(p.shape, generator=g)
    peft.save_pretrained(rd / "adapter")
    (rd / "result.json").write_text(json.dumps({"name": name}))
    return rd


def _reference_loss(model, head_weight, fg):
    """The loss with `head_weight` as LM head, computed apart from the Scorer."""
    from loradrift.forgetting import lm_loss

    model.lm_head.weight = torch.nn.Parameter(head_weight.detach().clone())
    return lm_loss(model.eval(), fg.seqs, 4, fg.tokenizer.pad_token_id, torch.device("cpu"))[0]


def test_untouched_model_forgets_nothing(tiny):
    from loradrift.forgetting import Forgetting

    cfg, model_dir, out = tiny
    fg = Forgetting(cfg)
    full = _full_run(out, "untouched_full", _base(model_dir))
    lora = _lora_run(out, "untouched_lora", model_dir)  # PEFT starts B at zero: the base model
    assert fg.run(full)["delta_loss"] == 0.0
    assert fg.run(lora)["delta_loss"] == 0.0
    assert fg.base()["n_tokens"] == sum(len(s) - 1 for s in fg.seqs) > 50


def test_noised_weights_forget(tiny):
    from loradrift.forgetting import Forgetting

    cfg, model_dir, out = tiny
    fg = Forgetting(cfg)
    model = _base(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and n.endswith("proj.weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert fg.run(_full_run(out, "noised_full", model))["delta_loss"] > 0.1
    assert fg.run(_lora_run(out, "noised_lora", model_dir, noise=0.5))["delta_loss"] > 0.1


def test_full_ft_is_scored_with_the_base_lm_head(tiny):
    """The tiny model ties its LM head to the input embeddings: noising the embeddings of a full FT
    run must move the inputs only, the head stays the base's."""
    from loradrift.forgetting import Forgetting

    cfg, model_dir, out = tiny
    fg = Forgetting(cfg)
    model = _base(model_dir)
    assert model.config.tie_word_embeddings
    base_head = model.get_output_embeddings().weight.detach().clone()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.add_(0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(2)))
    got = fg.run(_full_run(out, "emb_noised", model))
    model.config.tie_word_embeddings = False
    want = _reference_loss(model, base_head, fg)
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    # and the run's own (tied, noised) head would have given another loss
    assert abs(_reference_loss(model, model.get_input_embeddings().weight, fg) - want) > 1e-3


def test_lora_loss_matches_peft_merge(tiny):
    from peft import PeftModel

    from loradrift.forgetting import Forgetting

    cfg, model_dir, out = tiny
    fg = Forgetting(cfg)
    rd = _lora_run(out, "peft_ref", model_dir, noise=0.2)
    merged = PeftModel.from_pretrained(_base(model_dir), rd / "adapter").merge_and_unload()
    base_head = _base(model_dir).get_output_embeddings().weight
    assert fg.run(rd)["loss"] == pytest.approx(_reference_loss(merged, base_head, fg), rel=1e-5)


def test_runs_are_cached_by_their_result(tiny, monkeypatch):
    from loradrift.forgetting import Forgetting, Scorer

    cfg, model_dir, out = tiny
    rd = _lora_run(out, "cached", model_dir, noise=0.1)
    first = Forgetting(cfg).run(rd)
    calls = []
    orig = Scorer.run_loss
    monkeypatch.setattr(Scorer, "run_loss", lambda self, d: calls.append(d) or orig(self, d))
    assert Forgetting(cfg).run(rd) == first and calls == []
    (rd / "result.json").write_text(json.dumps({"redone": True}))  # the run was redone
    Forgetting(cfg).run(rd)
    assert len(calls) == 1


def test_general_text_is_held_out_and_fixed(tiny):
    from loradrift.data import read_squad_json, resolve_data_dir
    from loradrift.forgetting import general_text

    cfg, _, _ = tiny
    paras, info = general_text(cfg)
    assert len(paras) == len(set(paras)) == 6 and general_text(cfg)[0] == paras
    train = read_squad_json(resolve_data_dir(cfg) / "squad_v2" / "train-v2.0.first10articles.json")
    assert not set(paras) & {r["context"].strip() for r in train}
    assert info["pool_articles"] == 35 and info["pool_paragraphs"] == 1204


# --------------------------------------------------------------------------
# the correlation


def test_spearman_reference_values():
    from loradrift.stats import rank_correlation

    r = rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r["rho"] == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    # ties get average ranks: rho is the Pearson correlation of (1, 2.5, 2.5, 4, 6, 5) and the y ranks
    r = rank_correlation([1, 2, 2, 3, 9, 7], [1, 2, 3, 4, 6, 5])
    x, y = np.array([1, 2.5, 2.5, 4, 6, 5]), np.array([1, 2, 3, 4, 6, 5])
    assert r["rho"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    perfect = rank_correlation([0.1, 0.4, 0.2, 0.9, 0.5], [1, 4, 2, 9, 5])
    assert perfect["rho"] == pytest.approx(1.0) and perfect["exact"]
    assert perfect["p_value"] == pytest.approx(2 / math.factorial(5))  # two-sided exact: 1 of 120 each way
    assert perfect["decision"] == "positive"


def test_spearman_tiny_n_and_constant_input_are_undetermined():
    from loradrift.stats import rank_correlation

    assert rank_correlation([1, 2], [3, 4])["decision"] == "undetermined"
    four = rank_correlation([1, 2, 3, 4], [1, 2, 3, 4])  # best attainable p = 2/24 > 0.05
    assert four["rho"] == pytest.approx(1.0) and four["decision"] == "undetermined" and four["min_p"] == pytest.approx(2 / 24)
    const = rank_correlation([1, 2, 3, 4, 5, 6], [0.5] * 6)
    assert const["decision"] == "undetermined" and const["rho"] is None and "constant" in const["reason"]
    # many ties leave too few distinct arrangements, even with n = 6
    ties = rank_correlation([0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 1])
    assert ties["decision"] == "undetermined" and ties["min_p"] >= 0.05
    big = rank_correlation(list(range(12)), [v + (1 if v % 2 else 0) for v in range(12)])
    assert big["decision"] == "positive" and not big["exact"]
