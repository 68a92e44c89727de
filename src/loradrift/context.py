"""`setup`, which builds a run's `Context` (the model, data and engine one training process
works with; defined in loradrift.engine, whose functions all take it) for any method (the method's `apply` handler in loradrift.methods says which
parameters train: `apply_full`, `apply_lora`): runs, search trials, Ray tasks, sanity checks
and memory profiles all start here."""

from __future__ import annotations

import torch

from loradrift.config import RunConfig
from loradrift.data import TaskData, encode, load_task
from loradrift.engine import BlockCompile, Context, SplitFeatures, pick_device, repeated_blocks, resolve_engine, total_steps_for
from loradrift.models import build_task_model, compute_dtype, is_decoder, load_tokenizer, resolve_model_dir
from loradrift.runtime import set_threads
from loradrift.tasks import get_task


def setup(cfg: RunConfig, data: TaskData | None = None) -> Context:
    # Every training process comes through here (runs, search trials, Ray tasks, sanity checks,
    # memory profiles), and loading and tokenising use the threads too: set them first.
    threads = set_threads(cfg.runtime.threads)
    spec = get_task(cfg.task)
    data = data or load_task(cfg, spec)
    model_dir = resolve_model_dir(cfg.model)
    device = pick_device()
    dtype = compute_dtype(cfg.model, device)
    tokenizer = load_tokenizer(model_dir, is_decoder(model_dir))
    # Both methods keep fp32 weights and compute in `dtype` under autocast: a LoRA backbone stored
    # in bf16 would be a rounded copy of the base model, and that rounding alone shows up as drift.
    model = build_task_model(model_dir, spec, cfg.model, head_seed=cfg.seed, dtype=torch.float32)
    ctx = Context(cfg, spec, data, model_dir, tokenizer, model, device, dtype)
    ctx.threads = threads
    ctx.feats = SplitFeatures(lambda split: encode(spec, tokenizer, getattr(data, split), cfg))
    ctx.engine = eng = resolve_engine(cfg.train.engine, device, total_steps_for(cfg, len(ctx.feats["train"])))
    if eng.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works under LoRA too.
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Both methods seed torch's global RNG the same way: it drives LoRA's A init and, for both,
    # dropout (encoders; LoRA dropout), which full FT used to leave unseeded.
    torch.manual_seed(cfg.seed)
    ctx.peft = ctx.method.handler("apply")(ctx)
    model.to(device)
    if eng.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx.forward = model
    # dynamic=None: the first new shape recompiles once with symbolic sizes, which then serve
    # every other length bucket and batch size (a static graph per bucket would cost one
    # compilation, tens of seconds, each). CUDA graphs are still recorded per shape.
    if eng.compile and eng.compile_scope == "blocks":
        ctx.compiled = BlockCompile(repeated_blocks(model.backbone), eng.compile_mode)
    elif eng.compile:
        ctx.forward = torch.compile(model, mode=eng.compile_mode)
    return ctx


def apply_full(ctx: Context) -> None:
    """Full FT: everything trains (the head too)."""
    model = ctx.model
    for p in model.parameters():
        p.requires_grad_(True)
    # An untied LM head (TinyLlama) is not on the classification path: it would get no
    # gradient, yet sit in every checkpoint. A tied one is the input embedding and trains.
    backbone = model.backbone
    out_emb = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if out_emb is not None and out_emb.weight is not backbone.get_input_embeddings().weight:
        out_emb.weight.requires_grad_(False)
    return None


def apply_lora(ctx: Context):
    """LoRA: PEFT adapters on the block projections, and the head; returns the PeftModel wrapper."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, cfg = ctx.model, ctx.cfg
    lc = cfg.method.lora
    present = {n.split(".")[-1] for n, _ in model.backbone.named_modules()}
    missing = [t for t in lc.target_modules if t not in present]
    if missing:
        raise ValueError(f"method.lora.target_modules: {missing} not found in model {cfg.model.name}")
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                          use_rslora=lc.use_rslora, bias="none")
    peft_model = get_peft_model(model.backbone, peft_cfg)
    # PEFT casts each adapted projection's input to the fp32 adapter dtype, and under bf16
    # autocast the adapter matmul casts it straight back: two copies of the activation (and two
    # more in the backward pass) wherever that input is bf16, i.e. o_proj and down_proj (the
    # others read the fp32 residual stream), 60 projections in SmolLM2. The matmul casts its own
    # inputs, so with dropout 0 the arithmetic is identical; with dropout the mask is drawn on the
    # bf16 tensor (same distribution). In fp32 (CPU) there is no cast at all.
    for m in peft_model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False
    for p in model.head.parameters():
        p.requires_grad_(True)
    return peft_model
