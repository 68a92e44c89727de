"""Phase 3b: what does serving several LoRA adapters side by side cost, compared with merged weights?

    loradrift serve-bench --backend vllm --adapters sst2,squad_v2,mrpc,rte [--online]

Configurations (built by :func:`plan_configs` from the adapters given):

* ``base``          the base CausalLM, no adapter (a control: it should cost about what merged does);
* ``merged-<task>`` one per adapter: the adapter merged into the base (``merged/`` run folder, or
                    made here with PEFT ``merge_and_unload`` when missing);
* ``adapters-<k>``  k adapters loaded at once on the base, unmerged (k = 1, 2 and all); requests are
                    assigned to adapters round-robin, so one batch mixes requests for different
                    adapters (PEFT ``generate(adapter_names=[...])``, or PEFT's plain forward of its
                    one active adapter for adapters-1; vLLM one ``LoRARequest`` per prompt).

Modules: :mod:`.adapters` (prompts, adapter checks, merging, configurations), :mod:`.backends`
(``hf``: transformers + PEFT, runs anywhere; ``vllm``: offline ``vllm.LLM``, the ``[serve]`` /
``[serve-cpu]`` extra; engine settings), :mod:`.offline` (timed batches, interleaved rounds,
overhead), :mod:`.online` (vLLM's OpenAI server under Poisson load), :mod:`.correctness`
(adapter vs merged, adapter vs base) and :mod:`.results` (tables and figures). See
docs/serving.md for what each number means.
"""

from .adapters import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_TEMPLATE,
    PAIR_TASKS,
    SERVE_EXTRA_HINT,
    ServeConfig,
    ServeError,
    adapter_rank,
    build_prompts,
    encode_prompts,
    ensure_merged,
    plan_configs,
    prompt_pool,
    read_adapter_config,
    validate_adapter,
    validate_adapters,
)
from .backends import (
    BACKENDS,
    BASE_ROW,
    GenOut,
    HFBackend,
    VLLMBackend,
    engine_cli_args,
    engine_settings,
    parse_backends,
    vllm_available,
)
from .correctness import DIFFERS_MARGIN, TOLERANCE, match_rate
from .offline import (
    correctness_report,
    interleaved_schedule,
    latency_stats,
    mean_ci,
    overhead_per_round,
    overhead_table,
    rebuild_overhead,
    round_starts,
    row_adapters,
    run_serve_bench,
)
from .online import (
    DEFAULT_RATES,
    DEFAULT_SLO_MS,
    k_tasks_cost,
    merged_engines,
    online_configs,
    run_online,
)
from .results import (
    CORRECTNESS_COLUMNS,
    ONLINE_COLUMNS,
    OVERHEAD_COLUMNS,
    RESULT_COLUMNS,
    plot_latency,
    write_online_results,
    write_serve_results,
)

__all__ = [
    "BACKENDS",
    "BASE_ROW",
    "CORRECTNESS_COLUMNS",
    "DEFAULT_BATCH_SIZES",
    "DIFFERS_MARGIN",
    "DEFAULT_RATES",
    "DEFAULT_SLO_MS",
    "DEFAULT_TEMPLATE",
    "GenOut",
    "HFBackend",
    "ONLINE_COLUMNS",
    "OVERHEAD_COLUMNS",
    "PAIR_TASKS",
    "RESULT_COLUMNS",
    "SERVE_EXTRA_HINT",
    "ServeConfig",
    "ServeError",
    "TOLERANCE",
    "VLLMBackend",
    "adapter_rank",
    "build_prompts",
    "correctness_report",
    "encode_prompts",
    "engine_cli_args",
    "engine_settings",
    "ensure_merged",
    "interleaved_schedule",
    "k_tasks_cost",
    "latency_stats",
    "match_rate",
    "mean_ci",
    "merged_engines",
    "online_configs",
    "overhead_per_round",
    "overhead_table",
    "parse_backends",
    "plan_configs",
    "plot_latency",
    "prompt_pool",
    "read_adapter_config",
    "rebuild_overhead",
    "round_starts",
    "row_adapters",
    "run_online",
    "run_serve_bench",
    "validate_adapter",
    "validate_adapters",
    "vllm_available",
    "write_online_results",
    "write_serve_results",
]
