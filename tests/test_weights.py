import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from loradrift import weights as Wt

MODEL, TASK = "tiny", "sst2"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


# --- pure functions ---------------------------------------------------------


def test_effective_rank_by_hand():
    # squares 9, 4, 1 (total 14): top-1 explains 9/14 = 0.64, top-2 13/14 = 0.93 >= 0.9
    assert Wt.effective_rank([3, 2, 1]) == 2
    assert Wt.effective_rank([1, 2, 3]) == 2  # order does not matter
    assert Wt.effective_rank([3, 2, 1], threshold=0.6) == 1
    assert Wt.effective_rank([3, 2, 1], threshold=0.95) == 3
    assert Wt.effective_rank([0, 0, 0]) == 0
    # r equal values: k/r >= 0.9 needs k = ceil(0.9 r): r itself for r <= 9, but 9 for r = 10
    assert Wt.effective_rank([1.0] * 4) == 4
    assert Wt.effective_rank([1.0] * 10) == 9


@pytest.mark.parametrize("r", [1, 3, 4])
def test_effective_rank_of_planted_low_rank_matrix(r):
    rng = np.random.default_rng(r)
    delta = rng.normal(size=(40, r)) @ rng.normal(size=(r, 30))
    s = np.linalg.svd(delta, compute_uv=False)
    assert Wt.effective_rank(s) <= r
    # equal singular values: every one of the r directions is needed (r <= 9)
    equal = _orthonormal(rng, 40, r) @ _orthonormal(rng, 30, r).T
    st = Wt.delta_stats(torch.zeros(40, 30) + torch.eye(40, 30), torch.from_numpy(equal).float())
    assert st["effective_rank"] == r
    np.testing.assert_allclose(st["singular_values"][:r], 1.0, atol=1e-5)
    np.testing.assert_allclose(st["singular_values"][r:], 0.0, atol=1e-5)


def test_low_rank_factors_give_the_same_spectrum_as_the_dense_update():
    rng = np.random.default_rng(0)
    B = torch.from_numpy(rng.normal(size=(50, 4))).float()
    A = torch.from_numpy(rng.normal(size=(4, 30))).float()
    W = torch.from_numpy(rng.normal(size=(50, 30))).float()
    dense = Wt.delta_stats(W, B @ A)
    low = Wt.delta_stats(W, B @ A, factors=(B, A))
    np.testing.assert_allclose(low["singular_values"][:4], dense["singular_values"][:4], rtol=1e-4)
    assert low["effective_rank"] == dense["effective_rank"]
    assert low["intruders"] == dense["intruders"]


def test_relative_norm():
    W = torch.randn(20, 10)
    st = Wt.delta_stats(W, torch.zeros_like(W))
    assert st["rel_norm"] == 0.0 and st["effective_rank"] == 0 and st["intruders"] == 0
    st = Wt.delta_stats(W, 0.5 * W)
    assert st["rel_norm"] == pytest.approx(0.5, rel=1e-6)


def _base_with_known_svd(rng, out=40, inp=10):
    U = _orthonormal(rng, out, inp)
    V = _orthonormal(rng, inp, inp)
    s = np.arange(inp, 0, -1, dtype=np.float64)  # 10, 9, ..., 1: distinct, so vectors are unique
    return U, s, V, (U * s) @ V.T


def test_no_intruders_without_change():
    rng = np.random.default_rng(0)
    *_, W = _base_with_known_svd(rng)
    W = torch.from_numpy(W)
    count, sims = Wt.intruder_dimensions(W, W.clone(), k=10, eps=0.6)
    assert count == 0
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_one_planted_intruder():
    rng = np.random.default_rng(1)
    U, s, V, W = _base_with_known_svd(rng)
    # u orthogonal to every left singular vector of the (tall) base; v = the base's weakest
    # right singular vector. Then W_ft^T W_ft = W^T W + big^2 v v^T exactly, so only that one
    # direction changes: its new left singular vector is (s_min u_min + big u) / sqrt(s_min^2
    # + big^2), whose best match among the base's vectors is u_min with cosine
    # s_min / sqrt(s_min^2 + big^2) = 1 / sqrt(401).
    u = rng.normal(size=40)
    u -= U @ (U.T @ u)
    u /= np.linalg.norm(u)
    big = 20.0  # larger than the base's top singular value (10)
    W_ft = W + big * np.outer(u, V[:, -1])
    count, sims = Wt.intruder_dimensions(torch.from_numpy(W), torch.from_numpy(W_ft), k=10, eps=0.6)
    assert count == 1
    assert sims[0] == pytest.approx(1 / math.sqrt(401), abs=1e-6)  # the new top direction
    np.testing.assert_allclose(sims[1:], 1.0, atol=1e-6)
    # the threshold decides: with eps below 1/sqrt(401) the same direction is not an intruder
    assert Wt.intruder_dimensions(torch.from_numpy(W), torch.from_numpy(W_ft), eps=0.01)[0] == 0


# --- loading real PEFT adapters and full-FT folders ------------------------------


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg)


def _make_lora_run(base_dir: Path, run_dir: Path, seed: int, **lora_kwargs):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B = 0, which would make dW = 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(run_dir / "adapter")
    merged = peft_model.merge_and_unload()
    return {k: v.clone() for k, v in merged.state_dict().items()}


def _make_full_run(base_dir: Path, run_dir: Path, seed: int, sd=0.05):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * sd)
    model.save_pretrained(run_dir / "model")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "models" / MODEL
    _tiny_llama().save_pretrained(d)
    return d


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_delta_matches_merge_and_unload(base_dir, tmp_path, rslora):
    merged = _make_lora_run(base_dir, tmp_path, seed=3, use_rslora=rslora)
    base = load_file(str(base_dir / "model.safetensors"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scale = 8 / 2 if rslora else 8 / 4
    seen = set()
    for name, W, delta in Wt.load_deltas(base_dir, tmp_path):
        key = name + ".weight"
        torch.testing.assert_close(W, base[key].float())
        torch.testing.assert_close(delta, merged[key] - base[key], atol=1e-6, rtol=0)
        assert delta.abs().max() > 0.1
        assert Wt.lora_scale(cfg, name, 4) == scale
        seen.add(name.rsplit(".", 1)[1])
    assert seen == set(TARGETS)
    assert sum(1 for _ in Wt.load_deltas(base_dir, tmp_path)) == 2 * len(TARGETS)


def test_full_delta(base_dir, tmp_path):
    _make_full_run(base_dir, tmp_path, seed=1)
    base = load_file(str(base_dir / "model.safetensors"))
    ft = load_file(str(tmp_path / "model" / "model.safetensors"))
    items = list(Wt.load_deltas(base_dir, tmp_path))
    assert len(items) == 2 * 7  # every block projection, nothing else (no norms, embeddings)
    for name, _, delta in items:
        torch.testing.assert_close(delta, ft[name + ".weight"] - base[name + ".weight"])


def test_alpha_pattern():
    cfg = {"lora_alpha": 8, "alpha_pattern": {"q_proj": 32}}
    assert Wt.lora_scale(cfg, "model.layers.0.self_attn.q_proj", 4) == 8
    assert Wt.lora_scale(cfg, "model.layers.0.self_attn.v_proj", 4) == 2


def test_dora_is_refused(base_dir, tmp_path):
    _make_lora_run(base_dir, tmp_path, seed=0, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        list(Wt.load_deltas(base_dir, tmp_path))


def test_analyse_weights_writes_tables_and_figure(base_dir, tmp_path):
    out = tmp_path / "out"
    for seed in range(2):
        _make_lora_run(base_dir, out / "runs" / MODEL / TASK / "lora" / f"seed{seed}", seed)
        _make_full_run(base_dir, out / "runs" / MODEL / TASK / "full" / f"seed{seed}", seed)
    (out / "runs" / MODEL / TASK / "full" / "seed2").mkdir()  # unfinished: warned, skipped
    res = Wt.analyse_weights(out, MODEL, base_dir, "all", top_k=4)

    with open(out / "weights" / "weights_layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 * 3 + 2 * 7)
    assert list(rows[0])[-4:] == ["sv_1", "sv_2", "sv_3", "sv_4"]
    lora = [r for r in rows if r["method"] == "lora"]
    assert {r["module"] for r in lora} == set(TARGETS)
    assert all(int(r["effective_rank"]) <= 4 for r in lora)
    assert all(float(r["rel_norm"]) > 0 for r in rows)

    summary = {(r["method"], r["seed"]): r for r in res["summary"]}
    assert summary[("full", 0)]["n_modules"] == 14 and summary[("lora", 1)]["n_modules"] == 6
    with open(out / "weights" / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    js = json.loads((out / "weights" / "summary.json").read_text())
    assert js["settings"]["intruder_eps"] == 0.6 and len(js["summary"]) == 4
    assert js["by_task"][TASK]["lora"]["n_seeds"] == 2
    assert js["by_task"][TASK]["lora"]["mean_effective_rank"] <= 4

    fig = out / "weights" / "figures" / f"weights_by_layer_{TASK}.png"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # restricting FT to LoRA's targets makes the two comparable matrix for matrix
    res = Wt.analyse_weights(out, MODEL, base_dir, [TASK], modules=TARGETS, figures=False)
    assert {r["n_modules"] for r in res["summary"]} == {6}
