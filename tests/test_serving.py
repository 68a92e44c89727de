"""Serving benchmark: statistics on synthetic latencies, input checks, and the hf backend end to
end on a tiny random Llama (CPU, fp32)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from loradrift import serving
from loradrift.serving import ServeError

TASKS = ("sst2", "squad_v2", "mrpc", "rte")
SENTENCES = [
    "the movie was great and fun to watch",
    "a terrible boring film with bad actors",
    "what is the capital of france ? paris is the capital",
    "the cat sat on the mat and the dog ran in the park",
    "question : who wrote the book ? answer : nobody knows",
    "sentence one is equal to sentence two . yes no maybe",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------
# Tiny model helpers (also imported by test_serving_vllm.py)
# ---------------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def make_base(path: Path, hidden: int = 128, heads: int = 2, kv_heads: int = 1, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM. head_dim 64 (hidden 128 / 2 heads) because vLLM's CPU attention
    accepts only a few head sizes (64 is one); the HF tests are indifferent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                      max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=1,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_adapter(base_dir: Path, path: Path, seed: int, r: int = 4, std: float = 0.2) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # PEFT initialises B to zero, which would make the adapter a no-op
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path)
    return path


def make_merged(base_dir: Path, adapter_dir: Path, path: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_prompts(n: int = 6) -> dict[str, list[str]]:
    out = {}
    for i, t in enumerate(TASKS):
        texts = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(n)]
        out[t] = serving.build_prompts(texts, template="{text} answer :")
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls on a shared 2-core CI box are several times slower with OpenMP threads fighting
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make_base(root / "base")
    adapters = {t: make_adapter(base, root / "runs" / t / "adapter", seed=i + 1) for i, t in enumerate(TASKS)}
    # one task ships its merged/ folder, the others are merged by the benchmark
    merged = {"sst2": make_merged(base, adapters["sst2"], root / "runs" / "sst2" / "merged")}
    return {"root": root, "base": base, "adapters": adapters, "merged": merged, "prompts": make_prompts()}


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_latency_stats_match_numpy(n):
    x = np.random.default_rng(n).lognormal(size=n)
    st = serving.latency_stats(x)
    assert st["mean"] == pytest.approx(x.mean())
    assert st["p50"] == pytest.approx(np.median(x))
    assert st["p95"] == pytest.approx(np.percentile(x, 95))


def test_overhead_per_round_exact():
    # merged mean per round = (1 + 3) / 2 = 2; adapters 2.5 -> 25 %
    got = serving.overhead_per_round([2.5, 3.0], {"a": [1.0, 1.0], "b": [3.0, 3.0]})
    assert got == pytest.approx([25.0, 50.0])
    with pytest.raises(ValueError):
        serving.overhead_per_round([1.0, 2.0], {"a": [1.0]})


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_overhead_ci_contains_planted_overhead(method):
    rng = np.random.default_rng(0)
    planted, n = 20.0, 30
    merged = {t: list(rng.normal(1.0 + 0.3 * i, 0.01, n)) for i, t in enumerate(["sst2", "squad_v2"])}
    m = np.mean([merged["sst2"], merged["squad_v2"]], axis=0)
    adapters = m * (1 + planted / 100) * rng.normal(1.0, 0.02, n)
    per_round = serving.overhead_per_round(list(adapters), merged)
    mean, lo, hi = serving.mean_ci(per_round, method=method)
    assert lo < planted < hi
    assert hi - lo < 3.0  # 2 % noise over 30 rounds gives a tight interval
    assert mean == pytest.approx(planted, abs=1.5)


def test_mean_ci_t_matches_scipy_and_single_value():
    from scipy import stats

    x = [1.0, 2.0, 4.0, 3.0]
    mean, lo, hi = serving.mean_ci(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(ref)
    m1, lo1, hi1 = serving.mean_ci([5.0])
    assert m1 == 5.0 and np.isnan(lo1) and np.isnan(hi1)
    with pytest.raises(ValueError):
        serving.mean_ci(x, method="nope")


def test_match_rate_counts_common_prefix_only():
    assert serving.match_rate([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    # diverges at position 1: later agreement (3, 4) does not count
    assert serving.match_rate([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.25
    assert serving.match_rate([[1, 2], [5, 6]], [[1, 2], [7, 6]]) == 0.5


def test_build_prompts_and_pool():
    p = serving.build_prompts(["a  b\n c", "d"], template="Review: {text}\nSentiment:")
    assert p == ["Review: a b c\nSentiment:", "Review: d\nSentiment:"]
    with pytest.raises(ValueError):
        serving.build_prompts(["x"], template="no field")
    assert serving.prompt_pool({"a": ["a0", "a1"], "b": ["b0"]}, ["a", "b"]) == ["a0", "b0", "a1"]


@pytest.mark.parametrize("tasks,expected", [
    (["rte"], ["base", "merged-rte", "adapters-1"]),
    (["mrpc", "rte"], ["base", "merged-mrpc", "merged-rte", "adapters-1", "adapters-2"]),
    (["mrpc", "sst2", "squad_v2"], ["base", "merged-mrpc", "merged-sst2", "merged-squad_v2", "adapters-1", "adapters-2",
                                    "adapters-3"]),
    (list(TASKS), ["base"] + [f"merged-{t}" for t in TASKS] + ["adapters-1", "adapters-2", "adapters-4"]),
])
def test_plan_configs(tasks, expected):
    cfgs = serving.plan_configs(Path("b"), {t: Path(t) for t in tasks}, {t: Path("m" + t) for t in tasks})
    assert [c.name for c in cfgs] == expected
    if "sst2" in tasks and "squad_v2" in tasks:
        assert next(c for c in cfgs if c.name == "adapters-2").tasks == ("sst2", "squad_v2")
        # adapters-1 is the first adapter of the pair: beside adapters-2 it separates the LoRA
        # path's fixed cost from the cost of a second adapter
        assert next(c for c in cfgs if c.name == "adapters-1").tasks == ("sst2",)


def test_row_adapters_round_robin_at_every_batch_size():
    cfg = serving.plan_configs(Path("b"), {t: Path(t) for t in TASKS}, {t: Path(t) for t in TASKS})[-1]
    assert cfg.name == "adapters-4"
    # batch 1: successive requests (rounds) go to successive adapters, not always the first
    assert [serving.row_adapters(cfg, r, 1)[0] for r in range(5)] == list(TASKS) + [TASKS[0]]
    assert serving.row_adapters(cfg, 2, 3) == [TASKS[2], TASKS[3], TASKS[0]]
    merged = serving.plan_configs(Path("b"), {"rte": Path("r")}, {"rte": Path("m")})[1]
    assert serving.row_adapters(merged, 0, 2) is None


@pytest.mark.parametrize("all_loaded", [True, False])
def test_interleaved_schedule(all_loaded):
    names = ["base", "merged-a", "merged-b", "adapters-2"]
    plan = serving.interleaved_schedule(names, rounds=10, restarts=2, all_loaded=all_loaded, seed=3)
    # every configuration is timed in every round exactly once, and started once per block
    rounds = [(c, r) for w, c, r in plan if w == "round"]
    assert sorted(rounds) == sorted((c, r) for c in names for r in range(10))
    assert sorted(c for w, c, _ in plan if w == "load") == sorted(names * 2)
    # a round is only timed while its configuration is loaded
    live: set[str] = set()
    for w, c, _ in plan:
        if w == "load":
            live.add(c)
        elif w == "close":
            live.remove(c)
        else:
            assert c in live
    assert not live
    # no configuration runs all its rounds back to back: others run between its two blocks
    for c in names:
        idx = [i for i, (w, c2, _) in enumerate(plan) if w == "round" and c2 == c]
        between = {c2 for w, c2, _ in plan[idx[0]:idx[-1]] if w == "round"}
        assert between > {c}
    if all_loaded:
        # within a round every configuration runs once, in an order that changes between rounds
        per_round = [[c for w, c, r in plan if w == "round" and r == k] for k in range(10)]
        assert all(sorted(o) == sorted(names) for o in per_round)
        assert len({tuple(o) for o in per_round}) > 1
    else:
        # the order of the configurations differs between the two engine starts (seed 3)
        loads = [c for w, c, _ in plan if w == "load"]
        assert loads[:4] != loads[4:]
    assert plan == serving.interleaved_schedule(names, 10, 2, all_loaded, seed=3)
    with pytest.raises(ValueError, match="engine starts"):
        serving.interleaved_schedule(names, rounds=1, restarts=2, all_loaded=all_loaded)


def test_overhead_interval_is_over_engine_starts():
    """Issue 25 point 9: rounds of one engine start are not independent; with several starts the
    overhead table's interval is over the per-start means, and each round's start is recorded for
    H3 (stats.h3_serving makes the start its unit too)."""
    assert serving.round_starts(10, 3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    cfgs = serving.plan_configs(Path("b"), {"a": Path("a")}, {"a": Path("m")}, include_base=False)
    rows = []
    for r, s in enumerate(serving.round_starts(6, 3)):
        rows += [{"backend": "vllm", "config": "merged-a", "batch_size": 8, "round": r, "start": s, "latency_mean_s": 1.0},
                 {"backend": "vllm", "config": "adapters-1", "batch_size": 8, "round": r, "start": s,
                  "latency_mean_s": 1.1 + 0.1 * s + 0.001 * r}]
    (row,) = serving.overhead_table(rows, cfgs)
    per_start = [np.mean(row["per_round"][2 * s:2 * s + 2]) for s in range(3)]
    _, lo, hi = serving.mean_ci(per_start)
    assert row["engine_starts"] == 3 and row["start_by_round"] == [0, 0, 1, 1, 2, 2] and row["n_rounds"] == 6
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi)) and "3 per-start means" in row["ci_method"]
    assert hi - lo > 2 * (max(row["per_round"]) - min(row["per_round"]))  # 2 df, not 5


VLLM_BUNDLE = Path(__file__).resolve().parents[1] / "docs" / "results" / "smollm2-study-vllm-2026-11-26"


def test_committed_vllm_bundle_recomputes_h3():
    """Issue 25 point 11: the committed vLLM bundle had no overhead.json, so H3 could not be
    recomputed from it. Its overhead.json is rebuilt from results.csv and meta.json (each round's
    engine start as the benchmark split them): the same overheads as its overhead.csv, and H3
    recomputed from it with the engine start as the unit."""
    from loradrift import stats
    from loradrift.io import json_safe

    with open(VLLM_BUNDLE / "results.csv") as f:
        rows = list(csv.DictReader(f))
    meta = json.loads((VLLM_BUNDLE / "meta.json").read_text())
    rebuilt = json.loads(json.dumps(json_safe(serving.rebuild_overhead(rows, meta))))
    committed = json.loads((VLLM_BUNDLE / "overhead.json").read_text())
    assert rebuilt == committed
    with open(VLLM_BUNDLE / "overhead.csv") as f:
        assert [float(r["overhead_pct"]) for r in csv.DictReader(f)] == pytest.approx([r["overhead_pct"] for r in committed])
    a4 = next(r for r in committed if r["config"] == "adapters-4")
    assert a4["start_by_round"] == [0] * 5 + [1] * 5 and a4["paired"] is False
    (h3,) = stats.h3_serving({8: {"adapters": a4["adapter_latency_by_round"], "merged": a4["merged_latency_by_round"],
                                  "paired": False, "starts": a4["start_by_round"]}}, label="vllm/adapters-4")
    assert h3.n == 2 and "2 engine starts" in h3.ci_method
    assert h3.estimate == pytest.approx(142.1, abs=0.1) and h3.decision == "not supported" and h3.ci_high > 300


def test_engine_settings_are_fair_and_recorded():
    """The GPU path cannot run on this CPU-only machine; its settings are built and checked here."""
    from loradrift.serving.backends import _resolve_dtype

    cfgs = {c.name: c for c in serving.plan_configs(Path("b"), {t: Path(t) for t in TASKS}, {t: Path(t) for t in TASKS})}
    assert _resolve_dtype("auto", "cuda") == "bfloat16" and _resolve_dtype("auto", "cpu") == "float32"
    kw = serving.engine_settings(cfgs["adapters-4"], Path("b"), "cuda", "bfloat16", 300, 8, 16)
    assert kw["enable_prefix_caching"] is False and kw["dtype"] == "bfloat16"
    assert kw["enable_lora"] is True and kw["max_loras"] == 4 and kw["max_lora_rank"] == 8
    assert kw["max_num_seqs"] == 16 and kw["enforce_eager"] is False and kw["max_model_len"] == 300
    merged = serving.engine_settings(cfgs["merged-rte"], Path("b"), "cuda", "bfloat16", 300, 8, 16)
    assert "enable_lora" not in merged and merged["enable_prefix_caching"] is False
    # vLLM accepts only some ranks: the adapters' largest rank is rounded up to the next one
    from loradrift.serving.backends import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    assert serving.engine_settings(cfgs["adapters-4"], Path("b"), "cpu", "float32", 300, 4, 16)["max_lora_rank"] == 8
    args = serving.engine_cli_args(kw)
    assert "--no-enable-prefix-caching" in args and args[args.index("--max-lora-rank") + 1] == "8"
    assert args[args.index("--dtype") + 1] == "bfloat16" and args[args.index("--max-num-seqs") + 1] == "16"


# ---------------------------------------------------------------------------
# hf backend end to end
# ---------------------------------------------------------------------------


def test_hf_end_to_end(tiny, tmp_path, monkeypatch):
    out = tmp_path / "serve"
    timed = []
    real_generate = serving.HFBackend.generate

    def recording(self, batch, adapter_names, max_tokens, logprobs=False):
        timed.append((self.config.name, None if adapter_names is None else tuple(adapter_names)))
        return real_generate(self, batch, adapter_names, max_tokens, logprobs)

    monkeypatch.setattr(serving.HFBackend, "generate", recording)
    res = serving.run_serve_bench(
        tiny["base"], tiny["adapters"], tiny["merged"], tiny["prompts"], backend="hf",
        batch_sizes=[1, 2], max_tokens=6, rounds=3, warmup=1, out_dir=out,
        device="cpu", check_prompts=8, check_tokens=6, log=lambda *_: None,
    )
    names = ["base"] + [f"merged-{t}" for t in TASKS] + ["adapters-1", "adapters-2", "adapters-4"]
    for f in ["results.csv", "results.json", "overhead.csv", "overhead.json", "correctness.json", "correctness.csv",
              "meta.json", "figures/latency.png"]:
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.tmp")), "temporary files left behind"

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == serving.RESULT_COLUMNS
    assert len(rows) == len(names) * 2 * 3
    assert {r["config"] for r in rows} == set(names)
    for r in rows:
        assert float(r["latency_mean_s"]) > 0 and float(r["throughput_tok_s"]) > 0
        assert float(r["ttft_mean_s"]) <= float(r["latency_mean_s"])
        assert float(r["peak_rss_mb"]) > 0
        assert float(r["throughput_tok_s"]) == pytest.approx(float(r["throughput_rps"]) * 6)
    assert json.loads((out / "results.json").read_text())[0].keys() == set(serving.RESULT_COLUMNS)

    with open(out / "overhead.csv") as f:
        ov = list(csv.DictReader(f))
    assert list(ov[0]) == serving.OVERHEAD_COLUMNS
    assert {(r["config"], int(r["batch_size"])) for r in ov} == {
        (c, b) for c in ("base", "adapters-1", "adapters-2", "adapters-4") for b in (1, 2)}
    for r in ov:
        assert int(r["n_rounds"]) == 3
        assert float(r["ci_low"]) <= float(r["overhead_pct"]) <= float(r["ci_high"])
    ovj = json.loads((out / "overhead.json").read_text())
    a2 = next(r for r in ovj if r["config"] == "adapters-2")
    assert a2["reference"] == "mean(merged-sst2+merged-squad_v2)" and len(a2["per_round"]) == 3
    assert next(r for r in ovj if r["config"] == "adapters-1")["reference"] == "mean(merged-sst2)"
    assert a2["paired"] is True and len(a2["adapter_latency_by_round"]) == len(a2["merged_latency_by_round"]) == 3
    assert a2["start_by_round"] == [0, 0, 0] and a2["engine_starts"] == 1 and {r["start"] for r in rows} == {"0"}
    # the timed rounds interleave the configurations (every configuration once per round, in a
    # random order), instead of one configuration's rounds back to back
    last = [c for c, _ in timed[-len(names) * 2 * 3:]]
    rounds = [last[i * len(names) * 2:(i + 1) * len(names) * 2] for i in range(3)]
    for r in rounds:
        assert sorted(set(r)) == sorted(names) and all(r.count(n) == 2 for n in names)
    assert len({tuple(dict.fromkeys(r)) for r in rounds}) > 1  # the order is shuffled per round
    # adapters are assigned round-robin over the request stream: at batch 1 the rounds of
    # adapters-4 go to different adapters
    a4_b1 = [a for c, a in timed[-len(names) * 2 * 3:] if c == "adapters-4" and len(a) == 1]
    assert [a[0] for a in a4_b1] == [TASKS[0], TASKS[1], TASKS[2]]

    # unmerged adapters in a mixed batch reproduce each merged model in fp32, and each differs from the base
    corr = res["correctness"]
    agree = [c for c in corr if c["check"] == "adapter vs merged"]
    assert {(c["config"], c["task"]) for c in agree} == {("adapters-1", "sst2"), ("adapters-2", "sst2"),
                                                         ("adapters-2", "squad_v2")} | {("adapters-4", t) for t in TASKS}
    assert all(c["passed"] and c["match_rate"] == 1.0 and c["max_abs_logprob_diff"] < 1e-4 for c in agree)
    assert next(c for c in agree if c["config"] == "adapters-1")["n_tokens"] == 8 * 6  # every check prompt
    assert next(c for c in agree if c["config"] == "adapters-4")["n_tokens"] == 2 * 6  # its round-robin share
    differs = [c for c in corr if c["check"] == "adapter differs from base"]
    assert sorted(c["task"] for c in differs) == sorted(TASKS) and all(c["passed"] for c in differs)
    assert all(c["config"] == "adapters-4" and c["logprob_tolerance"] == serving.DIFFERS_MARGIN["float32"]
               for c in differs)
    assert res["findings"] == [] and meta_findings(out) == []
    # the missing merged folders were made in the cache; the given one was used as is
    meta = json.loads((out / "meta.json").read_text())
    assert meta["merged"]["sst2"] == str(tiny["merged"]["sst2"])
    assert (out / "merged_cache" / "rte" / "config.json").is_file()
    # max_lora_rank defaults to the largest adapter rank (4 here), and the settings are recorded
    assert meta["max_lora_rank"] == 4 and meta["max_lora_rank_source"] == "largest adapter rank"
    assert meta["engine_settings"]["hf"]["adapters-4"]["dtype"] == "float32"
    assert meta["engine_restarts"] == {"hf": 1}
    # issue 25 point 11: the settings describe each configuration's own path
    hf = meta["engine_settings"]["hf"]
    assert hf["base"]["lora"].startswith("none") and hf["merged-rte"]["lora"].startswith("none")
    assert "one active adapter" in hf["adapters-1"]["lora"] and "mixed-batch" in hf["adapters-4"]["lora"]


def meta_findings(out):
    return json.loads((out / "meta.json").read_text())["findings"]


def test_zero_adapter_is_a_finding_not_a_crash(tiny, tmp_path):
    """An adapter of zeros (lora_B = 0) reproduces the base model exactly: the differs-from-base
    check must fail, while the adapter-vs-merged check (merged = base) alone would pass it. Issue 25
    point 7: that is a finding about the adapter (runs that did not learn make such adapters), so
    the benchmark finishes, and says so in its results and meta.json, instead of raising."""
    zero = make_adapter(tiny["base"], tmp_path / "zero", seed=5, std=0.0)
    adapters = {"sst2": tiny["adapters"]["sst2"], "rte": zero}
    said = []
    res = serving.run_serve_bench(tiny["base"], adapters, {}, tiny["prompts"], backend="hf", batch_sizes=[1],
                                  max_tokens=2, rounds=1, warmup=0, out_dir=tmp_path / "s", device="cpu",
                                  check_prompts=4, check_tokens=6, include_base=False, log=said.append)
    (finding,) = res["findings"]
    assert finding.startswith("hf/adapters-2/rte: the adapter's outputs equal the base model's")
    assert meta_findings(tmp_path / "s") == [finding] and any(finding in m for m in said)
    rows = json.loads((tmp_path / "s" / "correctness.json").read_text())
    by = {(r["check"], r["task"]): r for r in rows}
    assert by[("adapter differs from base", "rte")]["passed"] is False
    assert by[("adapter differs from base", "rte")]["max_abs_logprob_diff"] == 0.0
    assert by[("adapter differs from base", "sst2")]["passed"] is True
    assert by[("adapter vs merged", "rte")]["passed"] is True


def test_correctness_comparisons_exact():
    from loradrift.serving import correctness as C

    base = {"tokens": [[1, 2, 3], [4, 5, 6]], "logprobs": [[-0.1, -0.2, -0.3], [-1.0, -1.0, -1.0]]}
    same = {"tokens": [[1, 2, 3], [4, 5, 6]], "logprobs": [[-0.1, -0.2005, -0.3], [-1.0, -1.0, -1.0]]}
    # row 2 diverges at position 1; its later logprobs are not compared
    other = {"tokens": [[1, 2, 3], [4, 9, 6]], "logprobs": [[-0.1, -0.2, -0.3], [-1.5, -9.0, -9.0]]}
    c = C.compare(base, other)
    assert c["match_rate"] == pytest.approx(4 / 6) and c["rows_differing"] == 1
    assert c["max_abs_logprob_diff"] == pytest.approx(0.5)
    assert C.agreement_row("hf", "a", "t", "m", base, same, "float32")["passed"]
    assert not C.agreement_row("hf", "a", "t", "m", base, other, "float32")["passed"]
    # the differs-from-base margin is its own, below the agreement tolerance (issue 25 point 7): an
    # adapter trained a few steps moves a logprob by 5e-4 < 2e-3 and still changes the model
    assert C.differs_row("hf", "a", "t", base, same, "float32")["passed"]
    tiny_move = {"tokens": base["tokens"], "logprobs": [[-0.1, -0.200005, -0.3], [-1.0, -1.0, -1.0]]}
    assert not C.differs_row("hf", "a", "t", base, tiny_move, "float32")["passed"]  # 5e-6 < 1e-5: rounding
    assert C.differs_row("hf", "a", "t", base, other, "float32")["passed"]
    with pytest.raises(ValueError, match="no correctness tolerance for dtype 'int8'"):
        C.tolerance("int8")


def test_adapters_change_outputs_and_routing(tiny):
    """Guards the test itself: adapters must differ from the base and from each other, or a
    correct-looking match rate would prove nothing."""
    be = serving.HFBackend(tiny["base"], "cpu", "float32", 64, 8)
    ids = serving.encode_prompts(be.tokenizer, tiny["prompts"]["sst2"][:3], 32)
    merged = {t: tiny["merged"]["sst2"] for t in TASKS}  # merged folders are not used here
    cfgs = {c.name: c for c in serving.plan_configs(tiny["base"], tiny["adapters"], merged)}
    be.load(cfgs["base"])
    base = be.generate(ids, None, 6).tokens
    be.load(cfgs["adapters-2"])
    a = be.generate(ids, ["sst2"] * 3, 6).tokens
    b = be.generate(ids, ["squad_v2"] * 3, 6).tokens
    mixed = be.generate(ids, ["sst2", "squad_v2", "sst2"], 6).tokens
    assert a != base and a != b
    assert mixed == [a[0], b[1], a[2]]
    # adapters-1 takes PEFT's plain forward of its one adapter, not the mixed-batch path (issue 25
    # point 11), and answers the same
    be.load(cfgs["adapters-1"])
    seen = []
    real = be.model.generate
    be.model.generate = lambda **kw: seen.append(set(kw)) or real(**kw)
    assert be.generate(ids, ["sst2"] * 3, 6).tokens == a and "adapter_names" not in seen[-1]
    # ... unless a row asks for the base model (the differs-from-base check)
    be.generate(ids, ["sst2", serving.BASE_ROW, "sst2"], 6)
    assert "adapter_names" in seen[-1]


def test_wrong_merged_model_fails_correctness(tiny, tmp_path):
    merged = {"sst2": tiny["merged"]["sst2"], "squad_v2": tiny["merged"]["sst2"]}  # squad_v2 gets sst2's
    with pytest.raises(ServeError, match=r"correctness check failed.*squad_v2.*tables were written to"):
        serving.run_serve_bench(
            tiny["base"], {t: tiny["adapters"][t] for t in ("sst2", "squad_v2")}, merged, tiny["prompts"],
            backend="hf", batch_sizes=[1], max_tokens=4, rounds=1, warmup=0, out_dir=tmp_path / "s",
            max_lora_rank=8, device="cpu", log=lambda *_: None,
        )
    # the message says the tables were written: they were, before it was raised (issue 25 point 7)
    rows = json.loads((tmp_path / "s" / "correctness.json").read_text())
    assert any(not r["passed"] and r["task"] == "squad_v2" for r in rows) and (tmp_path / "s" / "overhead.json").is_file()


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _bench(tiny, tmp_path, adapters, **kw):
    args = dict(backend="hf", batch_sizes=[1], max_tokens=2, rounds=1, warmup=0,
                out_dir=tmp_path / "s", max_lora_rank=8, device="cpu", log=lambda *_: None)
    args.update(kw)
    return serving.run_serve_bench(tiny["base"], adapters, {}, tiny["prompts"], **args)


def test_rank_above_max_lora_rank(tiny, tmp_path):
    big = make_adapter(tiny["base"], tmp_path / "big", seed=9, r=16)
    with pytest.raises(ServeError, match=r"adapter 'rte' \(.*/big\) has rank 16 > max_lora_rank 8"):
        _bench(tiny, tmp_path, {"sst2": tiny["adapters"]["sst2"], "rte": big})


def test_missing_adapter_folder(tiny, tmp_path):
    with pytest.raises(ServeError, match=r"adapter 'mrpc': folder .* does not exist"):
        _bench(tiny, tmp_path, {"mrpc": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match=r"adapter 'mrpc': .*adapter_config.json is missing"):
        _bench(tiny, tmp_path, {"mrpc": tmp_path / "empty"})


def test_adapter_for_other_base_name(tiny, tmp_path):
    import shutil

    other = shutil.copytree(tiny["adapters"]["rte"], tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match=r"adapter 'rte' \(.*/other\) was trained on base 'meta-llama/Llama-2-7b-hf'"):
        _bench(tiny, tmp_path, {"rte": other})
    # the name check can be waived; the shapes still fit, so validation passes
    assert serving.validate_adapters(tiny["base"], {"rte": other}, 8, check_base_name=False) == {"rte": 4}


def test_adapter_with_wrong_shapes(tiny, tmp_path):
    small = make_base(tmp_path / "small", hidden=64, heads=4, kv_heads=2)
    wrong = make_adapter(small, tmp_path / "wrong", seed=3)
    with pytest.raises(ServeError, match=r"adapter 'sst2' \(.*/wrong\): '.*\.lora_[AB]\.weight' has shape .* does not fit base weight"):
        serving.validate_adapters(tiny["base"], {"sst2": wrong}, 8, check_base_name=False)
    # with the name check on, the recorded base (another local folder of a different architecture) is caught first
    with pytest.raises(ServeError, match="was trained on base"):
        _bench(tiny, tmp_path, {"sst2": wrong})


def test_vllm_not_installed(tiny, tmp_path, monkeypatch):
    from loradrift.serving import backends

    monkeypatch.setattr(backends, "vllm_available", lambda: False)
    with pytest.raises(ServeError, match=r"pip install 'loradrift\[serve\]'"):
        _bench(tiny, tmp_path, {"sst2": tiny["adapters"]["sst2"]}, backend="vllm")
    with pytest.raises(ServeError, match="unknown backend"):
        _bench(tiny, tmp_path, {"sst2": tiny["adapters"]["sst2"]}, backend="tgi")


def test_adapter_config_rank_that_does_not_match_the_weights(tiny, tmp_path):
    import shutil

    edited = shutil.copytree(tiny["adapters"]["mrpc"], tmp_path / "edited")
    cfg = json.loads((edited / "adapter_config.json").read_text())
    cfg["r"] = 8  # the weights have rank 4
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match=r"adapter 'mrpc' \(.*/edited\): '.*\.lora_[AB]\.weight' has shape .*, rank 4, "
                                         r"but adapter_config.json gives '.*' rank 8 \(r, rank_pattern\)"):
        serving.validate_adapters(tiny["base"], {"mrpc": edited}, 16)
    # rank_pattern is read as PEFT reads it: a module it names must have that rank too.
    cfg.update(r=4, rank_pattern={"v_proj": 2})
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match=r"'.*\.v_proj\.lora_[AB]\.weight' has shape .*, rank 4, but adapter_config.json "
                                         r"gives 'model\.layers\.\d\.self_attn\.v_proj' rank 2"):
        serving.validate_adapters(tiny["base"], {"mrpc": edited}, 16)
    cfg.update(rank_pattern={"v_proj": 4})
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    assert serving.validate_adapters(tiny["base"], {"mrpc": edited}, 16) == {"mrpc": 4}


# ---------------------------------------------------------------------------
# `loradrift serve-bench` on a study's run folders: bad adapters and serving errors through the CLI
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_study(tmp_path_factory):
    """A tiny-preset --out folder holding one finished sst2 LoRA run (seed serve.seed)."""
    from loradrift.config import resolve_config
    from loradrift.train import train_run

    out = tmp_path_factory.mktemp("lora-study") / "out"
    cfg = resolve_config(preset="tiny", task="sst2", overrides=["method.name=lora"], out_dir=out)
    cfg = cfg.model_copy(update={"seed": cfg.serve.seed})
    return Path(train_run(cfg)["run_dir"])


def _copy_study(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the study folder holding `run_dir`: (its --out, the copy's run folder)."""
    import shutil

    out = shutil.copytree(run_dir.parents[4], tmp_path / "out")
    return out, out / run_dir.relative_to(run_dir.parents[4])


def _serve_bench(out: Path, backend: str = "hf") -> int:
    from loradrift.cli import main

    return main(["serve-bench", "--preset", "tiny", "--out", str(out), "--adapters", "sst2", "--backend", backend])


def test_serve_bench_with_an_edited_rank_names_task_and_folder_before_any_merge(lora_study, tmp_path, capsys):
    out, rd = _copy_study(lora_study, tmp_path)
    cfg_path = rd / "serve_adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    r = cfg["r"]
    cfg_path.write_text(json.dumps({**cfg, "r": 2 * r}))
    assert _serve_bench(out) == 2
    err = capsys.readouterr().err
    assert f"adapter 'sst2' ({rd / 'serve_adapter'})" in err and f"rank {r}, but adapter_config.json gives" in err
    assert "size mismatch" not in err and "Traceback" not in err
    assert not (rd / "merged").exists() and not (out / "serve").exists()  # refused before PEFT loaded or merged it


def test_serve_bench_with_an_adapter_of_another_base_names_task_and_folder_before_any_merge(lora_study, tmp_path, capsys):
    import shutil

    out, rd = _copy_study(lora_study, tmp_path)
    adapter = rd / "serve_adapter"
    tiny_base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    other = make_adapter(make_base(tmp_path / "other-base", hidden=32), tmp_path / "other-adapter", seed=1)
    shutil.rmtree(adapter)
    shutil.copytree(other, adapter)
    assert _serve_bench(out) == 2
    err = capsys.readouterr().err
    assert f"adapter 'sst2' ({adapter}) was trained on base '{tmp_path / 'other-base'}'" in err
    # Under the right name (a copy renamed, say), the weights themselves do not fit.
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": tiny_base}))
    assert _serve_bench(out) == 2
    err += capsys.readouterr().err
    assert f"adapter 'sst2' ({adapter}): " in err and "does not fit base weight" in err
    assert "size mismatch" not in err and "Traceback" not in err
    assert not (rd / "merged").exists() and not (out / "serve").exists()


def test_serve_errors_reach_the_user_as_one_message(lora_study, tmp_path, capsys):
    out, _ = _copy_study(lora_study, tmp_path)
    assert _serve_bench(out, backend="tgi") == 2
    err = capsys.readouterr().err
    assert "loradrift serve-bench: error: unknown backend 'tgi' (hf | vllm)" in err and "Traceback" not in err


def test_progress_counts_the_timed_rounds(tiny, tmp_path):
    calls = []
    serving.run_serve_bench(tiny["base"], {"sst2": tiny["adapters"]["sst2"]}, tiny["merged"], tiny["prompts"], backend="hf",
                            batch_sizes=[1], max_tokens=2, rounds=3, warmup=0, out_dir=tmp_path / "s", device="cpu",
                            include_base=False, check_prompts=2, check_tokens=2, log=lambda *_: None,
                            progress=lambda done, n: calls.append((done, n)))
    assert calls == [(k, 6) for k in range(6)]  # merged-sst2 and adapters-1, three rounds each


def test_loaded_configurations_share_equal_weights_and_answer_the_same(tiny):
    """Issue 28 item 14: the hf backend's configurations stay loaded together, so tensors equal
    across them are held once; what each configuration generates does not change."""
    merged = {t: tiny["merged"]["sst2"] for t in TASKS}
    cfgs = {c.name: c for c in serving.plan_configs(tiny["base"], tiny["adapters"], merged)}
    serving.backends._LOADED.clear()  # models of earlier tests may still be alive
    loaded = {}
    for name in ("base", "merged-sst2", "adapters-2"):
        be = serving.HFBackend(tiny["base"], "cpu", "float32", 64, 8)
        be.load(cfgs[name])
        loaded[name] = be
    assert loaded["base"].settings["weights_shared_mb"] == 0
    base_params = dict(loaded["base"].model.named_parameters())
    merged_params = dict(loaded["merged-sst2"].model.named_parameters())
    # LoRA targeted every projection, so the merged model shares exactly the rest: embeddings,
    # norms and the LM head
    shared = {n for n, p in merged_params.items() if p.data_ptr() == base_params[n].data_ptr()}
    assert shared == {n for n in merged_params if not any(t in n for t in TARGETS)} and shared
    assert loaded["merged-sst2"].settings["weights_shared_mb"] > 0
    # under the adapters, every base weight is the base configuration's own
    peft_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                 for n, p in loaded["adapters-2"].model.named_parameters() if "lora_" not in n}
    assert all(p.data_ptr() == base_params[n].data_ptr() for n, p in peft_base.items())
    ids = serving.encode_prompts(loaded["base"].tokenizer, tiny["prompts"]["sst2"][:3], 32)
    got = {n: be.generate(ids, ["sst2", "squad_v2", "sst2"] if n == "adapters-2" else None, 6).tokens
           for n, be in loaded.items()}
    for be in loaded.values():
        be.close()
    for name in loaded:  # each alone, nothing to share with
        serving.backends._LOADED.clear()
        be = serving.HFBackend(tiny["base"], "cpu", "float32", 64, 8)
        be.load(cfgs[name])
        assert be.generate(ids, ["sst2", "squad_v2", "sst2"] if name == "adapters-2" else None, 6).tokens == got[name]
        be.close()


def test_too_few_check_prompts_for_the_adapters_is_an_error_before_any_timing(tiny, tmp_path):
    # two check prompts, round-robin over four adapters, would check two of them and crash on the rest
    with pytest.raises(ServeError, match=r"check_prompts=2 gives 2 correctness prompt\(s\) for 4 adapters"):
        _bench(tiny, tmp_path, tiny["adapters"], check_prompts=2)


@pytest.mark.parametrize("owned,k,threads,expect", [
    ([0, 1], 1, None, ["0,1"]),            # one engine: every owned core, none left to "auto"'s reserve
    ([0, 1], 2, None, ["0", "1"]),         # two side by side: one core each, not both on core 0
    ([0, 1], 4, None, ["0", "1", "0", "1"]),
    ([2, 3, 5, 7], 2, None, ["2,3", "5,7"]),  # a cpuset's cores, not 0..n-1
    ([0, 1, 2, 3], 1, 2, ["0,1"]),         # serve.cpu_threads caps the cores taken
])
def test_vllm_cpu_engines_share_the_owned_cores_out(monkeypatch, owned, k, threads, expect):
    from loradrift import runtime
    from loradrift.serving.backends import cpu_binds

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(owned), raising=False)
    assert cpu_binds(k, threads) == expect
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the user's own bind is kept
    assert cpu_binds(k, threads) == ["0-1"] * k
