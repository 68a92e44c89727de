"""Phase 3, secondary analysis (not pre-registered): does the model forget, and does the
representation that moved more forget more?

    loradrift study ...            (Phase 3 runs it when forgetting.enabled, the default)

Forgetting of one final run is ``Δloss = L_run - L_base``: the mean next-token cross-entropy
(nats per predicted token) of the run's fine-tuned backbone **with the base model's LM head** on
held-out general text, minus the base model's loss on exactly the same tokens. The task head is
not used; the LM head is the base's, so Δloss measures what fine-tuning did to the transformer
(embeddings, blocks, final norm), the part drift measures too. For full FT the backbone is the
run's ``model/`` folder (its own LM head, tied to the trained embeddings or not, is replaced by
the base's); for LoRA it is the base weights plus ``scale * B @ A`` on every adapted projection,
read by :func:`loradrift.weights.load_deltas` exactly as PEFT merges it.

The text: Wikipedia paragraphs, the contexts of the SQuAD v2 dev set, deduplicated, from the
articles that are not in the SQuAD v2 train data (SQuAD splits by article, so that is all 35; the
exclusion is checked, not assumed), then a seeded subset of ``forgetting.n_paragraphs``, each
truncated to ``forgetting.max_tokens`` tokens. The same tokens for every task: no run trains on
them. The squad_v2 runs train on train-split articles only; their dev score and probe set do read
some of these dev paragraphs, but only in forward passes (no gradient, no model selection: the
validation split is carved from train), so the text is held out for them too.

Per task and method: mean Δloss over seeds with a Student t-interval at ``stats.confidence``
(:func:`loradrift.stats.t_interval`, the interval the project's secondary per-task results use),
and Spearman's rank correlation, across runs, between the final drift (the aggregate H2 tests, read
from ``drift/comparison.json``) and Δloss: pooled, per task and per method, with a permutation
p-value and an explicit "undetermined" when n is too small or an input is constant, or when a task
the correlation is built on was not learned by both methods (the study's learning gate,
:func:`loradrift.learning.learning_gate`: then drift and Δloss describe runs that learned nothing).

Cost and caching: one forward pass over the text per run (fp32, TF32 off) plus one for the base
model; the base model is loaded once, LoRA runs are scored on it through forward hooks (no weight
copies) and full FT runs in one second copy of it.
Each run's loss is cached in ``<out>/forgetting/cache.json`` under a fingerprint of the text's
tokens and the run's ``result.json``, so a rerun evaluates only new or redone runs.

Outputs under ``<out>/forgetting/``: ``runs.csv`` (one row per run), ``summary.json`` (settings,
text provenance, base loss, per-run rows, per task x method intervals, correlations) and
``figures/forgetting.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loradrift import layout
from loradrift.config import RunConfig
from loradrift.io import atomic_path, atomic_write_json, json_safe, write_csv
from loradrift.methods import METHOD_NAMES, METHODS
from loradrift.stats import interval, rank_correlation

log = logging.getLogger(__name__)

LABEL = "secondary analysis, not pre-registered"
RUN_COLUMNS = ["task", "method", "seed", "loss", "base_loss", "delta_loss", "n_tokens", "drift", "run_dir"]


# --------------------------------------------------------------------------
# the text
# --------------------------------------------------------------------------


def general_text(cfg: RunConfig) -> tuple[list[str], dict]:
    """(paragraphs, provenance): the seeded sample of held-out Wikipedia paragraphs."""
    from loradrift.data import _read_hub, read_squad_json, resolve_data_dir, verify_checksum
    from loradrift.tasks import heldout_text_task

    spec = heldout_text_task()
    data_dir = resolve_data_dir(cfg)
    if data_dir is not None:
        for rel in (spec.dev_file, spec.train_file):
            if cfg.data.verify_checksums:
                verify_checksum(data_dir, rel)
        dev, train = read_squad_json(data_dir / spec.dev_file), read_squad_json(data_dir / spec.train_file)
        source = f"{data_dir / spec.dev_file} (train articles excluded: {data_dir / spec.train_file})"
    else:
        dev, train = _read_hub(spec, "dev"), _read_hub(spec, "train")
        source = f"Hugging Face Hub {spec.hub.path} validation (train articles excluded: its train split)"
    train_titles = {r["title"] for r in train}
    train_contexts = {r["context"].strip() for r in train}
    kept = {r["context"].strip(): r["title"] for r in dev if r["title"] not in train_titles}
    pool = sorted(c for c in kept if c not in train_contexts)
    if not pool:
        raise ValueError(f"forgetting: no SQuAD v2 dev paragraph outside the train articles in {source}")
    f = cfg.forgetting
    pick = sorted(np.random.default_rng(f.seed).permutation(len(pool))[: f.n_paragraphs].tolist())
    paragraphs = [pool[i] for i in pick]
    info = {"source": source, "pool_paragraphs": len(pool), "pool_articles": len(set(kept.values())),
            "dev_articles_excluded": len({r["title"] for r in dev} & train_titles),
            "paragraphs": len(paragraphs), "articles": len({kept[p] for p in paragraphs})}
    return paragraphs, info


def tokenize(tokenizer, paragraphs: list[str], max_tokens: int) -> list[list[int]]:
    ids = tokenizer(paragraphs, truncation=True, max_length=max_tokens)["input_ids"]
    return [list(x) for x in ids if len(x) >= 2]  # a one-token sequence predicts nothing


# --------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------


@torch.inference_mode()
def lm_loss(model, seqs: list[list[int]], batch_size: int, pad_id: int, device: torch.device) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats over every predicted token, number of tokens).

    Sequences are right-padded (a causal model's earlier positions never see the padding) and
    batched in a fixed length order, so two models see identical batches."""
    from loradrift.representations import _full_fp32_matmuls

    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    total, count = 0.0, 0
    with _full_fp32_matmuls():
        for k in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[k:k + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="none")
            keep = mask[:, 1:].reshape(-1).bool()
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    return total / count, count


class Scorer:
    """The base CausalLM, loaded once with its LM head untied from the input embeddings (so a full
    FT run's trained embeddings do not move the head). A LoRA run is scored on it through forward
    hooks that add ``x A^T (scale B)^T`` to each adapted projection, PEFT's own unmerged forward,
    so no weight is copied; a full FT run is written into a second copy of the model, all of it
    but the LM head, which stays the base's."""

    def __init__(self, base_model_dir: Path, seqs: list[list[int]], batch_size: int, pad_id: int):
        from loradrift.engine import pick_device
        from loradrift.models import load_backbone

        self.base_dir = Path(base_model_dir)
        self.device = pick_device()
        model = load_backbone(self.base_dir, True, torch.float32)
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"forgetting: {self.base_dir} has no LM head")
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        self.model = model.to(self.device).eval()
        self.head_key = next(n for n, p in self.model.named_parameters() if p is head.weight)
        self.seqs, self.batch_size, self.pad_id = seqs, batch_size, pad_id
        self._full = None  # the copy full FT runs are written into, made when first needed

    def loss(self, model=None) -> tuple[float, int]:
        return lm_loss(model or self.model, self.seqs, self.batch_size, self.pad_id, self.device)

    def run_loss(self, run_dir: Path) -> tuple[float, int]:
        run_dir = Path(run_dir)
        return self._full_loss(run_dir) if (run_dir / "model").is_dir() else self._lora_loss(run_dir)

    def _full_loss(self, run_dir: Path) -> tuple[float, int]:
        import copy

        from loradrift.weights import _SafetensorsFolder

        if self._full is None:
            self._full = copy.deepcopy(self.model)
        state = self._full.state_dict()
        ft = _SafetensorsFolder(run_dir / "model")
        keys = set(ft.keys()) - {self.head_key}
        # Every weight but the head is overwritten, so nothing of an earlier run can remain.
        missing, unknown = set(state) - keys - {self.head_key}, keys - set(state)
        if missing or unknown:
            raise ValueError(f"forgetting: {run_dir / 'model'} does not match the base model {self.base_dir}: "
                             f"missing {sorted(missing)[:3]}, unknown {sorted(unknown)[:3]}")
        with torch.no_grad():
            for key in keys:
                state[key].copy_(ft.get(key))
        return self.loss(self._full)

    def _lora_loss(self, run_dir: Path) -> tuple[float, int]:
        from loradrift.weights import load_lora_factors

        modules = dict(self.model.named_modules())
        hooks = []

        def add_update(B: torch.Tensor, A: torch.Tensor):
            return lambda mod, inputs, out: out + (inputs[0] @ A.T) @ B.T

        try:
            for name, (B, A) in load_lora_factors(run_dir).items():
                if name not in modules:
                    raise ValueError(f"forgetting: {run_dir}: adapted module {name} is not in the base model {self.base_dir}")
                hooks.append(modules[name].register_forward_hook(add_update(B.to(self.device), A.to(self.device))))
            return self.loss()
        finally:
            for h in hooks:
                h.remove()


# --------------------------------------------------------------------------
# cache and entry points
# --------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Forgetting:
    """Δloss of run folders, cached in ``<out>/forgetting/cache.json``; the model and text are
    loaded only when some run is not cached."""

    def __init__(self, cfg: RunConfig):
        from loradrift.models import is_decoder, load_tokenizer, resolve_model_dir

        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.model_dir = resolve_model_dir(cfg.model)
        if not is_decoder(self.model_dir):
            raise ValueError(f"forgetting: model {cfg.model.name} is an encoder without an LM head "
                             f"(set forgetting.enabled=false)")
        self.tokenizer = load_tokenizer(self.model_dir, True)
        self.paragraphs, self.text_info = general_text(cfg)
        self.seqs = tokenize(self.tokenizer, self.paragraphs, cfg.forgetting.max_tokens)
        self.key = _sha({"model": layout.model_key(cfg.model), "tokens": self.seqs})
        self.path = layout.path(self.out, "forgetting_cache")
        cache = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.cache: dict = cache if cache.get("text_key") == self.key else {"text_key": self.key, "runs": {}}
        self._scorer: Scorer | None = None
        self.seconds = 0.0

    def _scorer_now(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.model_dir, self.seqs, self.cfg.forgetting.batch_size, self.tokenizer.pad_token_id)
        return self._scorer

    def _save(self) -> None:
        atomic_write_json(self.path, self.cache)

    def base(self) -> dict:
        if "base" not in self.cache:
            t0 = time.time()
            loss, n = self._scorer_now().loss()
            self.cache["base"] = {"loss": loss, "n_tokens": n, "seconds": time.time() - t0}
            self.seconds += time.time() - t0
            self._save()
        return self.cache["base"]

    def run(self, run_dir: Path) -> dict:
        """{loss, base_loss, delta_loss, n_tokens} of one finished run folder."""
        run_dir = Path(run_dir)
        result = layout.run_path(run_dir, "result")
        fp = _sha({"text": self.key, "result": hashlib.sha256(result.read_bytes()).hexdigest()})
        try:
            rel = str(run_dir.resolve().relative_to(self.out.resolve()))
        except ValueError:
            rel = str(run_dir.resolve())
        base = self.base()
        hit = self.cache["runs"].get(rel)
        if not hit or hit.get("fingerprint") != fp:
            t0 = time.time()
            loss, n = self._scorer_now().run_loss(run_dir)
            hit = {"fingerprint": fp, "loss": loss, "n_tokens": n, "seconds": time.time() - t0}
            self.seconds += time.time() - t0
            self.cache["runs"][rel] = hit
            self._save()
        return {"loss": hit["loss"], "base_loss": base["loss"], "delta_loss": hit["loss"] - base["loss"],
                "n_tokens": hit["n_tokens"]}


def _drift_by_run(out: Path) -> dict[tuple[str, str, int], float]:
    path = layout.path(out, "drift_comparison")
    comp = json.loads(path.read_text()) if path.is_file() else {}
    found = {}
    for task, c in comp.items():
        for method in METHOD_NAMES:
            for seed, d in (c.get(f"drift_{method}_by_seed") or {}).items():
                found[(task, method, int(seed))] = float(d)
    return found


def analyse_forgetting(cfg: RunConfig, tasks: Sequence[str] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Δloss of every finished Phase 2 run (study tasks, methods and seeds), the per task x method
    intervals and the drift correlations; writes ``<out>/forgetting/``. ``progress(done, runs)``
    after each run looked at."""
    from loradrift.layout import model_key

    out = Path(cfg.out_dir)
    tasks = list(tasks or cfg.study.tasks)
    fg = Forgetting(cfg)
    drift = _drift_by_run(out)
    rows = []
    n_runs, looked = len(tasks) * len(cfg.study.methods) * len(cfg.study.seeds), 0
    for task in tasks:
        for method in cfg.study.methods:
            for seed in cfg.study.seeds:
                if progress:
                    progress(looked, n_runs)
                looked += 1
                rd = layout.run_dir(out, model_key(cfg.model), task, method, seed)
                if not layout.run_path(rd, "result").is_file():
                    continue
                r = fg.run(rd)
                rows.append({"task": task, "method": method, "seed": seed, **r,
                             "drift": drift.get((task, method, seed)), "run_dir": str(rd.relative_to(out))})
    conf = cfg.stats.confidence
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r["delta_loss"])
    by_group = [{"task": t, "method": m, **interval(v, conf)} for (t, m), v in groups.items()]
    with_drift = [r for r in rows if r["drift"] is not None]

    def corr(sel: list[dict]) -> dict:
        return rank_correlation([r["drift"] for r in sel], [r["delta_loss"] for r in sel], conf)

    from loradrift.learning import learning_gate

    gate = learning_gate(cfg, tasks)
    correlation = gate_correlations({
        "pooled": corr(with_drift),
        "by_task": {t: corr([r for r in with_drift if r["task"] == t]) for t in tasks if any(r["task"] == t for r in with_drift)},
        "by_method": {m: corr([r for r in with_drift if r["method"] == m]) for m in cfg.study.methods
                      if any(r["method"] == m for r in with_drift)},
    }, gate)
    notes = []
    if len(with_drift) < len(rows):
        notes.append(f"{len(rows) - len(with_drift)} run(s) have no final drift in drift/comparison.json "
                     f"(a task without both methods) and are left out of the correlations")
    notes.append("Within a task the pooled correlation mixes the two methods: a method difference in both drift and "
                 "Δloss alone makes it positive. The per-method correlations pool tasks, whose drift and Δloss "
                 "scales differ.")
    f = cfg.forgetting
    summary = {
        "label": LABEL,
        "definition": "Δloss = LM loss of the run's fine-tuned backbone with the base model's LM head minus the base "
                      "model's loss, on the same held-out Wikipedia tokens (nats per predicted token)",
        "settings": {**f.model_dump(), "confidence": conf},
        "text": {**fg.text_info, "tokens": sum(len(s) - 1 for s in fg.seqs), "text_key": fg.key},
        "base": fg.cache.get("base"),
        "runs": rows,
        "by_task_method": by_group,
        "correlation": correlation,
        "not_learned": gate,
        "notes": notes,
        "seconds_this_call": fg.seconds,
    }
    fdir = layout.path(out, "forgetting")
    write_csv(fdir / "runs.csv", RUN_COLUMNS, rows)
    atomic_write_json(layout.path(out, "forgetting_summary"), json_safe(summary))
    if rows:
        _plot(rows, by_group, fdir / "figures" / "forgetting.png")
    return summary


def _plot(rows: list[dict], groups: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_bar, ax_sc = fig.subplots(1, 2)
    colors = {m.name: m.color for m in METHODS.values()}
    for i, g in enumerate(groups):
        err = None if g["ci_low"] is None else [[g["mean"] - g["ci_low"]], [g["ci_high"] - g["mean"]]]
        ax_bar.bar(i, g["mean"], yerr=err, capsize=4, color=colors.get(g["method"], "#8c8c8c"))
        seeds = [r["delta_loss"] for r in rows if r["task"] == g["task"] and r["method"] == g["method"]]
        ax_bar.scatter([i] * len(seeds), seeds, s=12, color="black", zorder=3)
    ax_bar.axhline(0, color="black", lw=0.8)
    ax_bar.set_xticks(range(len(groups)), [f"{g['task']}\n{g['method']}" for g in groups], fontsize=7)
    ax_bar.set_ylabel("Δloss (nats / token)")
    ax_bar.set_title("Forgetting: mean over seeds, t-interval, seeds as dots", fontsize=9)
    markers = "osD^vP*X"
    tasks = sorted({r["task"] for r in rows})
    for r in rows:
        if r["drift"] is not None:
            ax_sc.scatter(r["drift"], r["delta_loss"], color=colors.get(r["method"], "#8c8c8c"),
                          marker=markers[tasks.index(r["task"]) % len(markers)], s=25)
    for m, c in colors.items():
        ax_sc.scatter([], [], color=c, label=m)
    for t in tasks:
        ax_sc.scatter([], [], color="grey", marker=markers[tasks.index(t) % len(markers)], label=t)
    ax_sc.set(xlabel="final drift (H2's aggregate)", ylabel="Δloss (nats / token)")
    ax_sc.set_title("Drift vs forgetting, one point per run", fontsize=9)
    ax_sc.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def gate_correlations(correlation: Mapping[str, Any], not_learned: Mapping[str, str]) -> dict[str, Any]:
    """The correlations with the learning gate applied (`learning.learning_gate`): a task that
    full FT or LoRA did not learn supports no conclusion about forgetting, nor does a correlation
    pooled over its runs. The numbers stay; the decision becomes undetermined, with the reason."""
    tasks = set(correlation.get("by_task") or {})

    def gated(c: Mapping[str, Any], over: set[str], why: str) -> dict[str, Any]:
        bad = sorted(over & set(not_learned))
        if not bad:
            return dict(c)
        old = f"; {c['reason']}" if c.get("decision") == "undetermined" and c.get("reason") else ""
        return {**c, "decision": "undetermined", "reason": why.format(", ".join(bad)) + old}

    pooled = "built on task(s) that did not learn: {}"
    return {"pooled": gated(correlation.get("pooled") or {}, tasks, pooled),
            "by_task": {t: gated(c, {t}, f"did not learn ({not_learned.get(t)})") for t, c in (correlation.get("by_task") or {}).items()},
            "by_method": {m: gated(c, tasks, pooled) for m, c in (correlation.get("by_method") or {}).items()}}


def secondary_result(out: Path, not_learned: Mapping[str, str]) -> dict | None:
    """The forgetting analysis as `stats/hypotheses.json` carries it (None when it did not run),
    its correlations behind the learning gate (`not_learned`: {task: why})."""
    path = layout.path(out, "forgetting_summary")
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return {"label": s["label"], "definition": s["definition"], "by_task_method": s["by_task_method"],
            "correlation": gate_correlations(s["correlation"], not_learned), "notes": s["notes"],
            "not_learned": dict(not_learned), "source": "forgetting/summary.json"}
