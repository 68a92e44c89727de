"""One typed config for every command.

Resolution order (later wins): field defaults → preset YAML → `--config` YAML files → dotted CLI
overrides (`train.lr=1e-4`). A preset or file may hold `per_task: {task: {...}}` blocks that apply
only when that task runs; CLI overrides still win over them. Unknown keys and wrong types raise
`ConfigError` naming the dotted key.

    from loradrift.config import resolve_config
    cfg = resolve_config(preset="tiny", overrides=["train.max_steps=5"], task="sst2")
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loradrift.methods import FULL, LORA, METHOD_NAMES, METHODS, MethodName
from loradrift.tasks import TASKS

CPU_PRESET, GPU_PRESET = "smollm2", "smollm2-gpu"
ALL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key or file."""


class _Strict(BaseModel):
    # extra="forbid" is what turns a typo in YAML or on the CLI into an error naming the key;
    # allow_inf_nan=False does the same for .inf / .nan (YAML numbers), which no setting means.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(_Strict):
    """Random-init Llama for tests: seconds on CPU."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    init_seed: int = Field(0, description="seed of the random init, so 'tiny' is one fixed model")
    vocab_size: int | None = Field(None, gt=0, description="embedding rows (null = the tokenizer's); a real model's vocabulary "
                                   "gives a random-init model of its shape the same memory footprint")
    tie_word_embeddings: bool = True


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2-135m",
        description="registry name (tiny, smollm2-135m, tinyllama-1.1b, minilm-l6), Hub id or local folder",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on a CUDA device that supports it, else float32"
    )
    pooling: Literal["auto", "last", "mean", "first"] = Field(
        "auto", description="sequence pooling for the classifier and the probes; auto = last non-padding token for decoders, first for encoders"
    )
    max_length: int = Field(128, gt=8, description="max tokens per example (SQuAD: per window)")
    trust_remote_code: bool = Field(False, description="never on by default: it runs code from the model repo")
    tiny: TinyModelConfig = TinyModelConfig()


class DataConfig(_Strict):
    data_dir: Path | None = Field(None, description="task data folder; default $LORADRIFT_DATA, else loradrift's own copy (docs/data.md)")
    source: Literal["auto", "local", "hub"] = Field(
        "auto", description="auto = --data-dir, $LORADRIFT_DATA or loradrift's own copy, else the HF Hub; local = never the Hub; hub = only the Hub"
    )
    verify_checksums: bool = True
    split_seed: int = Field(1234, description="fixed seed that carves validation from train and subsets dev: the same for every run")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out as the validation split")
    max_val_examples: int | None = Field(None, gt=0)
    max_train_examples: int | None = Field(None, gt=0, description="train subset, drawn with the run seed")
    max_dev_examples: int | None = Field(None, gt=0, description="dev (final test) subset, fixed by split_seed")
    doc_stride: int = Field(64, gt=0, description="SQuAD: token overlap between windows")
    max_answer_length: int = Field(30, gt=0, description="SQuAD: longest answer span in tokens")
    n_best: int = Field(20, gt=0, description="SQuAD: start/end candidates per window")


class LoraSettings(_Strict):
    r: int = Field(8, gt=0)
    # int | float: the rank ablation scales alpha with r (ablation.rank.alpha_rule), which can give
    # 18.5; a whole number stays an int, so the science hash of every existing config is unchanged.
    alpha: int | float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LORA_TARGETS))
    use_rslora: bool = False


class MethodConfig(_Strict):
    name: MethodName = LORA
    lora: LoraSettings = LoraSettings()


Switch = Literal["auto", "on", "off"]


class EngineConfig(_Strict):
    """How the training step runs, not what it computes. `auto` turns a switch on where it pays
    and can work (a CUDA device) and off elsewhere, so CPU runs stay exactly as they were
    (docs/training.md, "The engine")."""

    compile: Switch = Field("auto", description="torch.compile the training forward/backward; auto = on for CUDA runs of >= compile_min_steps steps")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; reduce-overhead adds CUDA graphs (needs fixed shapes: see pad_to_multiple_of)"
    )
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks",
        description="blocks = compile each repeated transformer block (one compilation serves them all: "
        "cold compilation of SmolLM2 took 3-6x less time than the whole model's); model = one graph of the whole model",
    )
    compile_min_steps: int = Field(500, gt=0, description="auto compiles only runs at least this long (compiling costs tens of seconds)")
    pad_to_multiple_of: int | None = Field(
        None,
        gt=0,
        description="pad each training batch's length up to a multiple of this "
        "(few distinct shapes, so compiled graphs are reused); null = auto (32 when compiling, else none)",
    )
    group_by_length: Switch = Field(
        "auto", description="training batches of similar lengths (less padding); the order stays a pure function of (seed, step); auto = on for CUDA"
    )
    fused_optimizer: Switch = Field("auto", description="fused AdamW kernel; auto = on for CUDA")
    tf32: Switch = Field("auto", description="TF32 tensor cores for fp32 matmuls; auto = on for CUDA")
    pin_memory: Switch = Field("auto", description="pinned host batches copied with non_blocking; auto = on for CUDA")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, ~1/3 more compute")

    @field_validator("compile", "group_by_length", "fused_optimizer", "tf32", "pin_memory", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        # YAML 1.1 (and so a bare `compile=on` override) reads on/off as booleans.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class TrainConfig(_Strict):
    lr: float | None = Field(None, gt=0, description="peak learning rate; null = the method's default (full 2e-5, lora 2e-4)")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0, description="validation every N steps (null: only at the end)")
    checkpoint_every: int = Field(50, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="stop after N evaluations without improvement")
    restore_best: bool = Field(False, description="final scores from the best validation checkpoint instead of the last step")
    eval_batch_size: int = Field(32, gt=0)
    eval_dev: bool = Field(True, description="score the official dev set at the end (search trials do not: their objective is validation)")
    eval_max_examples: int | None = Field(
        None,
        gt=0,
        description="mid-run validation (early stopping, pruning) on the first N validation "
        "examples (SQuAD: questions); the final validation always uses the whole split",
    )
    engine: EngineConfig = EngineConfig()

    def lr_for(self, method: str) -> float:
        return self.lr if self.lr is not None else METHODS[method].default_lr


class ProbeConfig(_Strict):
    enabled: bool = Field(True, description="write representation snapshots (search trials do not)")
    size: int = Field(512, gt=1, description="probe examples drawn from the official dev set")
    snapshot_every: int = Field(100, gt=0, description="representation snapshot every N optimizer steps")
    dtype: Literal["float32", "float16"] = "float32"
    seed: int = Field(0, description="seed of the probe sample: fixed so every run sees the same probe set")


class SanityConfig(_Strict):
    n_examples: int = Field(100, gt=0)
    max_steps: int = Field(60, gt=0)
    lr_full: float = Field(1e-4, gt=0)
    lr_lora: float = Field(2e-3, gt=0)
    batch_size: int = Field(10, gt=0)
    min_accuracy: float = Field(0.95, gt=0, le=1)
    min_squad_f1: float = Field(90.0, gt=0, le=100)


class ParamSpec(_Strict):
    """One searched hyperparameter: `name` is the dotted config key its value overrides."""

    name: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        where = f"search parameter {self.name!r}"
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"{where}: categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError(f"{where}: categorical takes 'choices', not low/high/log")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{where}: {self.type} needs 'low' and 'high'")
        if self.choices is not None:
            raise ValueError(f"{where}: {self.type} takes low/high, not 'choices'")
        if self.low > self.high:
            raise ValueError(f"{where}: low ({self.low:g}) > high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: a log scale needs low > 0 (got {self.low:g})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"{where}: int needs whole-number low and high")
        return self

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def extremes(self) -> list[Any]:
        """Values that must all give a valid config (checked before any trial runs)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


def _p(name: str, type: str, low=None, high=None, log=False, choices=None) -> ParamSpec:
    return ParamSpec(name=name, type=type, low=low, high=high, log=log, choices=choices)


def _default_spaces() -> dict[str, list[ParamSpec]]:
    # The seed's spaces (docs/search.md); only method.lora.r is left out, see SearchConfig.rank.
    return {
        FULL: [
            _p("train.lr", "float", 1e-6, 1e-4, log=True),
            _p("train.batch_size", "categorical", choices=[4, 8, 16]),
            _p("train.warmup_ratio", "float", 0.0, 0.2),
            _p("train.weight_decay", "float", 1e-5, 1e-1, log=True),
            _p("train.grad_accum", "categorical", choices=[1, 2, 4]),
        ],
        LORA: [
            _p("train.lr", "float", 5e-5, 5e-3, log=True),
            _p("method.lora.alpha", "int", 8, 64),
            _p("method.lora.dropout", "float", 0.0, 0.2),
            _p("train.batch_size", "categorical", choices=[4, 8]),
            _p("train.grad_accum", "categorical", choices=[1, 2]),
        ],
    }


class PrunerConfig(_Strict):
    """optuna.pruners.MedianPruner settings. Trials report validation scores against training
    examples seen (optimizer steps x batch size x grad_accum), so its "steps" are examples."""

    n_startup_trials: int = Field(5, ge=0, description="trials that are never pruned, to build the median")
    n_warmup_steps: int = Field(0, ge=0, description="no pruning before this many training examples seen")


class SearchConfig(_Strict):
    """Phase 1 settings: trial budget, storage, and the search spaces as data."""

    trials: int = Field(10, gt=0, description="finished (complete + pruned) trials per study")
    seed: int = Field(
        42,
        description="TPE sampler seed (trial n draws from (seed, n), so workers and resumed studies never repeat a trial) "
        "and the run seed of every trial",
    )
    storage: str | None = Field(None, description="SQLAlchemy URL; null = sqlite:///<out>/search/optuna.db")
    heartbeat_interval: int = Field(10, gt=0, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(60, gt=0, description="seconds without a heartbeat before a trial counts as dead and is retried")
    max_retry: int = Field(2, ge=0, description="times a dead trial is retried with the same values")
    max_failures: int = Field(3, gt=0, description="a worker gives up after this many failed trials in a row")
    keep_trial_weights: bool = Field(False, description="keep adapters/models/snapshots of trials (large)")
    trial_max_steps: int | None = Field(
        None,
        gt=0,
        description="optimizer steps of one trial (null = train.max_steps); "
        "shorter trials buy more trials in a fixed budget; not written to the best config",
    )
    pruner: PrunerConfig = PrunerConfig()
    spaces: dict[MethodName, list[ParamSpec]] = Field(default_factory=_default_spaces)
    fixed: dict[MethodName, dict[str, Any]] = Field(
        default_factory=lambda: {LORA: {"method.lora.r": 8}},
        description="dotted overrides every trial of a method gets (the hypotheses are about rank 8)",
    )
    rank: ParamSpec = Field(
        default_factory=lambda: _p("method.lora.r", "categorical", choices=[4, 8, 16, 32]),
        description="the LoRA rank parameter, searched only with --tune-rank",
    )

    @model_validator(mode="after")
    def _unique(self) -> SearchConfig:
        for method, space in self.spaces.items():
            names = [p.name for p in space]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"search.spaces.{method}: parameter {dup[0]!r} declared twice")
        return self

    def space_for(self, method: str, tune_rank: bool = False) -> tuple[list[ParamSpec], dict[str, Any]]:
        """(searched parameters, fixed overrides) of one study."""
        space = list(self.spaces.get(method, []))
        fixed = dict(self.fixed.get(method, {}))
        if tune_rank:
            if method not in METHODS or not METHODS[method].adapter:
                raise ConfigError("--tune-rank: only LoRA has a rank to search")
            space = [p for p in space if p.name != self.rank.name] + [self.rank]
            fixed.pop(self.rank.name, None)
        if not space:
            raise ConfigError(f"search.spaces.{method}: empty search space")
        return space, fixed


class DriftConfig(_Strict):
    metric: Literal["linear", "debiased", "rbf"] = Field(
        "debiased", description="CKA variant of the final-step drift (debiased: unbiased HSIC, valid with n << d)"
    )
    weights: bool = Field(True, description="also run the weight-space analysis (ΔW norms, spectra, intruder dimensions)")
    intruder_k: int = Field(10, gt=0, description="top singular vectors of W_ft checked for intruders")
    intruder_eps: float = Field(0.6, gt=0, lt=1, description="max |cos| to every base singular vector below which a vector is an intruder")
    rank_threshold: float = Field(0.9, gt=0, le=1, description="share of ΔW's squared spectrum the effective rank must explain")
    weight_modules: list[str] | None = Field(None, description="projections analysed in weight space (null = all seven); fewer is faster")


class ServeBenchConfig(_Strict):
    backend: str = Field("auto", description="auto (vllm when importable, else hf), hf, vllm, or hf,vllm")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    max_tokens: int = Field(128, gt=0, description="greedy tokens generated per request (EOS ignored)")
    rounds: int = Field(
        10, gt=1, description="timed rounds per configuration and batch size (H3 is undetermined below 10, the design its interval was validated for)"
    )
    warmup: int = Field(1, ge=0)
    max_lora_rank: int | None = Field(None, gt=0, description="vLLM's LoRA buffer rank (null = the largest adapter rank)")
    prompts_per_task: int = Field(32, gt=0)
    max_prompt_tokens: int = Field(256, gt=0)
    check_prompts: int = Field(32, gt=0, description="prompts of the correctness checks (adapter vs merged, adapter vs base)")
    check_tokens: int = Field(32, gt=0, description="greedy tokens per correctness prompt")
    include_base: bool = Field(True, description="time the base model as a control (H3 does not use it)")
    engine_restarts: int | None = Field(
        None, gt=0, description="engine starts per configuration, the rounds split among them (null: 1 on hf, 5 on vllm; H3 on vllm needs >= 2)"
    )
    cpu_threads: int | None = Field(None, gt=0, description="torch threads of the hf backend on a CPU (null: torch's default)")
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM's max running sequences (null = the largest batch size)")
    seed: int = Field(42, description="which Phase 2 seed's adapters are served")
    online: bool = Field(True, description="also run the online benchmark (vLLM's OpenAI server) when the backend includes vllm")
    online_rates: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], description="Poisson request rates (req/s) of the online sweep")
    online_saturate: bool = Field(True, description="end the sweep with every request sent at once (saturation)")
    online_requests: int = Field(100, gt=0, description="requests per rate (a p99 is reported only over >= 100 values)")
    online_max_tokens: int = Field(32, gt=0, description="output tokens per online request")
    online_merged_engines: bool = Field(
        True,
        description="also run the k merged models of the widest adapters-k as k "
        "servers at once, so 'k merged engines vs one engine + k adapters' is measured "
        "(needs k servers' memory)",
    )
    slo_ttft_ms: float = Field(2000.0, gt=0, description="goodput SLO: time to first token")
    slo_tpot_ms: float = Field(500.0, gt=0, description="goodput SLO: time per output token")
    slo_e2el_ms: float = Field(10000.0, gt=0, description="goodput SLO: end-to-end latency")


class StatsConfig(_Strict):
    confidence: float = Field(0.95, gt=0, lt=1, description="family-wise level: primary intervals are at 1 - (1 - confidence)/3")
    floor_factor: float = Field(10.0, gt=0, description="H2 is undetermined on a task whose FT drift is not above this x the noise floor")
    min_drift: float = Field(
        1e-4, ge=0, description="... nor above this drift (1 - CKA): a floor of 0, as on a deterministic CPU, must not let any drift decide H2"
    )
    h1_threshold: float = Field(3.0, description="H1: LoRA within this % of full FT")
    h2_threshold: float = Field(20.0, description="H2: at least this % less drift")
    h3_threshold: float = Field(30.0, description="H3: at most this % multi-adapter overhead")
    h3_batch: int = Field(8, gt=0, description="H3's primary batch size")
    h3_config: str = Field("adapters-4", description="H3's primary serving configuration (falls back to the largest adapters-k run)")


class StudyConfig(_Strict):
    seeds: list[int] = Field(default_factory=lambda: [42, 1337, 2024], description="Phase 2 seeds")
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    methods: list[MethodName] = Field(default_factory=lambda: list(METHOD_NAMES))
    search: bool = Field(True, description="run Phase 1; off = Phase 2 uses the config as it is")
    serve: bool = Field(True, description="run the serving benchmark in Phase 3")


class ForgettingConfig(_Strict):
    """Phase 3, secondary (not pre-registered): language-modelling loss of every final run's
    backbone, with the base model's LM head, on held-out Wikipedia text, against the base model's
    loss on the same tokens (docs/drift.md, "Forgetting")."""

    enabled: bool = Field(True, description="measure forgetting in Phase 3 (decoders only: an encoder has no LM head)")
    n_paragraphs: int = Field(
        64, gt=0, description="paragraphs drawn (seeded) from the deduplicated SQuAD v2 dev contexts of articles outside the SQuAD v2 train split"
    )
    max_tokens: int = Field(128, gt=1, description="tokens per paragraph (longer paragraphs are truncated)")
    batch_size: int = Field(8, gt=0)
    seed: int = Field(0, description="seed of the paragraph sample: the same text for the base model and every run")


class RankAblationConfig(_Strict):
    """LoRA rank ablation (docs/drift.md, "Rank ablation"): `loradrift ablate-rank`, or in the
    study's Phase 3 when `enabled`."""

    enabled: bool = Field(False, description="run the rank ablation in the study's Phase 3 (it trains len(ranks) x len(seeds) runs per task)")
    tasks: list[str] | None = Field(None, description="tasks of the study's ablation (null = study.tasks)")
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 64, 256], min_length=1)
    seeds: list[int] | None = Field(None, description="seeds per rank (null = study.seeds)")
    rslora: bool = Field(False, description="rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r")
    alpha_rule: Literal["ratio", "fixed"] = Field(
        "ratio",
        description="ratio: alpha / r kept at the task's best config's value (alpha = alpha_best * r / r_best); fixed: alpha_best at every rank",
    )

    @field_validator("ranks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(r <= 0 for r in v) or len(set(v)) != len(v):
            raise ValueError(f"ranks must be distinct positive integers, got {v}")
        return sorted(v)

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        from loradrift.tasks import TASKS

        for name in v or []:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
        return v


class AblationConfig(_Strict):
    rank: RankAblationConfig = RankAblationConfig()


class RuntimeConfig(_Strict):
    """How a process uses the machine, not what it computes: outside the science hash, so changing
    it never makes a finished run look like another config's."""

    threads: int | None = Field(
        None,
        gt=0,
        description="torch (OpenMP) intra-op threads of a training run, a search "
        "trial, the study's process and the serving benchmark; null = the cores the process may "
        "run on (all of them for a lone process; a Ray task takes this many CPUs, default 1). "
        'Several processes on one machine should share the cores out (docs/training.md, "Threads")',
    )


class RunConfig(_Strict):
    """Everything one command needs. `task` and `seed` are set per run."""

    task: str | None = None
    seed: int = 42
    out_dir: Path = Field(Path("runs/default"), description="study output folder (see docs/layout.md)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    probe: ProbeConfig = ProbeConfig()
    sanity: SanityConfig = SanityConfig()
    drift: DriftConfig = DriftConfig()
    serve: ServeBenchConfig = ServeBenchConfig()
    stats: StatsConfig = StatsConfig()
    study: StudyConfig = StudyConfig()
    search: SearchConfig = SearchConfig()
    forgetting: ForgettingConfig = ForgettingConfig()
    ablation: AblationConfig = AblationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    per_task: dict[str, dict[str, Any]] = Field(default_factory=dict, description="overrides applied only for one task")
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="experiment trackers that also get each run's config, curves and scores, e.g. "
        "report_to=[mlflow,tensorboard]; each is an optional extra (loradrift[mlflow] ...), see loradrift/tracking.py",
    )
    preset: str | None = None

    @field_validator("per_task")
    @classmethod
    def _known_tasks(cls, v: dict) -> dict:
        from loradrift.tasks import TASKS

        for name in v:
            if name not in TASKS:
                raise ValueError(f"per_task.{name}: unknown task (known: {', '.join(TASKS)})")
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.task is not None:
            from loradrift.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"task: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        return self

    def science_hash(self) -> str:
        """Hash of what determines a training run's numbers: not where it is written, nor the
        settings of later phases (changing a serving batch size must not invalidate runs)."""
        d = self.model_dump(mode="json", include={"task", "seed", "model", "data", "method", "train", "probe", "sanity"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# resolution


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("loradrift.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | str, what: str) -> dict:
    try:
        text = path.read_text() if isinstance(path, Path) else path
        data = yaml.safe_load(text) or {}
    except OSError as e:
        raise ConfigError(f"{what}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the top level must be a mapping of config keys")
    return data


def default_preset() -> tuple[str, str]:
    """The preset used where none is named, and why: `smollm2-gpu` where CUDA is available (the
    CPU preset's runs, sized for 45 minutes on 2 cores, would waste a GPU), `smollm2` elsewhere. Every command resolves the
    same way on a machine, so `report` after `study` finds the same output folder."""
    import torch

    if torch.cuda.is_available():
        return GPU_PRESET, f"a CUDA GPU is present ({torch.cuda.get_device_name(0)})"
    return CPU_PRESET, "no CUDA GPU is available"


def load_preset(name: str) -> dict:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    raw = _read_yaml(resources.files("loradrift.presets").joinpath(f"{name}.yaml").read_text(), f"preset {name}")
    raw["preset"] = name
    return raw


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> dict:
    """`train.lr=1e-4` → {"train": {"lr": 0.0001}}; the value is parsed as YAML, then typed by the schema."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; the schema would then reject it, so take numbers as numbers.
    if isinstance(parsed, str):
        with contextlib.suppress(ValueError):
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
    node: Any = parsed
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def _validate(raw: dict, origin: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown config key"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"invalid config ({origin}):\n" + "\n".join(lines)) from None


def resolve_config(
    preset: str | None = None,
    files: list[Path] | None = None,
    overrides: list[str] | None = None,
    task: str | None = None,
    **fields: Any,
) -> RunConfig:
    """Preset → files → overrides → validated RunConfig.

    Each layer's `per_task.<task>` block applies right after that layer, so a preset's per-task
    setting is a default that a later `--config` file (a best-config YAML, say) can override.
    Keyword `fields` are top-level values set by a command (task, seed, out_dir), applied like
    overrides.
    """
    name = preset or default_preset()[0]
    layers = [(f"preset {name}", load_preset(name))] + [(str(f), _read_yaml(Path(f), str(f))) for f in files or []]
    over: dict = {}
    for item in overrides or []:
        over = deep_merge(over, parse_override(item))
    over = deep_merge(over, {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items() if v is not None})
    if task is not None:
        over["task"] = task
    origin = " + ".join(o for o, _ in layers)

    flat: dict = {}
    for _, layer in layers:
        flat = deep_merge(flat, layer)
    cfg = _validate(deep_merge(flat, over), origin)
    # Every per_task block must be valid, not only the one this command happens to use.
    for t, block in cfg.per_task.items():
        _validate(deep_merge(deep_merge(flat, block), over), f"{origin}, per_task.{t}")
    if cfg.task is None:
        return cfg
    raw: dict = {}
    for _, layer in layers:
        raw = deep_merge(raw, layer)
        raw = deep_merge(raw, layer.get("per_task", {}).get(cfg.task, {}))
    return _validate(deep_merge(raw, over), f"{origin} for task {cfg.task}")


def load_run_config(path: Path) -> RunConfig:
    """A resolved config saved with a run (`config.yaml`), validated again."""
    return _validate(_read_yaml(Path(path), str(path)), str(path))


def save_config(cfg: RunConfig, path: Path) -> None:
    from loradrift.io import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())
