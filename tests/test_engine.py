"""The training engine's switches (docs/training.md, "The engine"), each checked on the CPU
against the plain path: what they change is speed, never what a run computes (beyond
floating-point rounding where the arithmetic is reordered)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loradrift.config import EngineConfig
from loradrift.context import setup
from loradrift.engine import (
    BatchOrder,
    CheckpointWriter,
    autocast,
    batch_order,
    make_optimizer,
    repeated_blocks,
    resolve_engine,
    train_step,
    trainable_parameters,
)
from loradrift.evaluate import evaluate
from loradrift.models import ClassificationHead, SpanAnswerabilityHead
from loradrift.train import train_run

# ---------------------------------------------------------------------------------------------
# switch resolution


def test_auto_is_off_on_a_cpu_and_on_for_cuda():
    cpu = resolve_engine(EngineConfig(), torch.device("cpu"), 10_000)
    assert not any([cpu.compile, cpu.group_by_length, cpu.fused_optimizer, cpu.tf32, cpu.pin_memory]) and cpu.pad_to_multiple_of is None
    long = resolve_engine(EngineConfig(), torch.device("cuda"), 500)
    assert long.compile and long.group_by_length and long.fused_optimizer and long.tf32 and long.pin_memory
    assert long.pad_to_multiple_of == 32  # compiled graphs need few shapes
    short = resolve_engine(EngineConfig(), torch.device("cuda"), 499)  # compiling would cost more than it saves
    assert not short.compile and short.pad_to_multiple_of is None
    forced = resolve_engine(EngineConfig(compile="on", group_by_length="on", pin_memory="on"), torch.device("cpu"), 1)
    assert forced.compile and forced.group_by_length and not forced.pin_memory  # pinning means nothing without a GPU


def test_yaml_on_off_are_switch_values(tiny_cfg):
    cfg = tiny_cfg(overrides=["train.engine.compile=off", "train.engine.fused_optimizer=on"])
    assert cfg.train.engine.compile == "off" and cfg.train.engine.fused_optimizer == "on"


# ---------------------------------------------------------------------------------------------
# data order


def test_length_grouped_order_is_a_pure_function_of_seed_and_step():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=203).tolist()
    a, b = BatchOrder(203, 8, seed=7, lengths=lengths, group=4), BatchOrder(203, 8, seed=7, lengths=lengths, group=4)
    per_epoch = a.per_epoch
    assert per_epoch == math.ceil(203 / 8)
    # Any step asked in any order (as after a resume) gives the same batch.
    ks = list(range(3 * per_epoch))
    assert [b(k) for k in reversed(ks)][::-1] == [a(k) for k in ks]
    for epoch in range(3):
        batches = [a(epoch * per_epoch + i) for i in range(per_epoch)]
        flat = [i for bt in batches for i in bt]
        assert sorted(flat) == list(range(203))  # each example once per epoch
        assert all(len(bt) == 8 for bt in batches[:-1]) and len(batches[-1]) == 203 % 8
    # Less padding than the plain shuffled order, and a different order for another seed.
    def padding(order):
        return sum(max(lengths[i] for i in order(k)) * len(order(k)) - sum(lengths[i] for i in order(k)) for k in range(per_epoch))
    assert padding(a) < 0.5 * padding(BatchOrder(203, 8, seed=7))
    assert [BatchOrder(203, 8, seed=8, lengths=lengths, group=4)(k) for k in range(5)] != [a(k) for k in range(5)]


def test_plain_order_is_unchanged():
    # The order CPU runs have always used: slices of torch.randperm seeded with (seed, epoch).
    order = BatchOrder(50, 8, seed=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 100_003 + 1)).tolist()
    assert [order(7 + i) for i in range(7)] == [perm[i : i + 8] for i in range(0, 50, 8)]


# ---------------------------------------------------------------------------------------------
# the step


def _reference_step(ctx, order, step, opt, sched):
    """The engine's step as it was written before the device-side bookkeeping: loss.item() and
    a float grad norm every step."""
    from loradrift.data import collate

    total = 0.0
    for a in range(ctx.cfg.train.grad_accum):
        batch = {
            k: v.to(ctx.device) for k, v in collate([ctx.feats["train"][i] for i in order(step * ctx.cfg.train.grad_accum + a)], ctx.pad_id).items()
        }
        loss = ctx.model(batch)["loss"] / ctx.cfg.train.grad_accum
        loss.backward()
        total += loss.item()
    gnorm = float(torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(ctx.model)], ctx.cfg.train.max_grad_norm))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total, gnorm


@pytest.mark.parametrize("task", ["sst2", "squad_v2"])
def test_device_side_step_numbers_equal_the_host_synced_ones(tiny_cfg, task):
    cfg = tiny_cfg(task, "full", overrides=["train.grad_accum=2"])
    ctxs = [setup(cfg), setup(cfg)]
    opts = [make_optimizer(c, 1e-3, 5) for c in ctxs]
    order = batch_order(ctxs[0], cfg.train.batch_size, cfg.seed)
    for step in range(4):
        st = train_step(ctxs[0], order, step, *opts[0])
        loss, gnorm = _reference_step(ctxs[1], order, step, *opts[1])
        assert isinstance(st.loss, torch.Tensor) and float(st.loss) == loss and float(st.grad_norm) == pytest.approx(gnorm, rel=1e-6)
        assert st.tokens <= st.padded_tokens
    for (n, p), (_, q) in zip(ctxs[0].model.named_parameters(), ctxs[1].model.named_parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n


def _losses(cfg, steps=4):
    ctx = setup(cfg)
    opt, sched = make_optimizer(ctx, 1e-3, steps)
    order = batch_order(ctx, cfg.train.batch_size, cfg.seed)
    return [float(train_step(ctx, order, s, opt, sched).loss) for s in range(steps)], ctx


@pytest.mark.parametrize(
    "switch", ["train.engine.pad_to_multiple_of=48", "train.engine.fused_optimizer=on", "train.engine.gradient_checkpointing=true"]
)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_engine_switches_do_not_change_what_is_computed(tiny_cfg, switch, method):
    task = "squad_v2" if "pad" in switch else "sst2"  # SQuAD windows vary in length, so padding really adds tokens
    # LoRA dropout draws one random number per activation, padded ones too: with padding the masks
    # differ (same distribution), so the comparison runs without dropout.
    base = ["method.lora.dropout=0"] if "pad" in switch else []
    plain, _ = _losses(tiny_cfg(task, method, overrides=base))
    switched, ctx = _losses(tiny_cfg(task, method, overrides=[*base, switch]))
    np.testing.assert_allclose(switched, plain, rtol=2e-5)
    if "pad" in switch:
        assert ctx.engine.pad_to_multiple_of == 48


# Inductor compiles C++ on the CPU: minutes per case on 2 cores (one took over 4), so these run with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("scope,extra", [("model", []), ("blocks", []), ("blocks", ["train.engine.gradient_checkpointing=true"])])
def test_compiled_step_matches_eager_on_cpu(tiny_cfg, scope, extra):
    base = ["method.lora.dropout=0", *extra]
    eager, _ = _losses(tiny_cfg("sst2", "lora", overrides=base), steps=3)
    compiled, ctx = _losses(tiny_cfg("sst2", "lora", overrides=[*base, "train.engine.compile=on", f"train.engine.compile_scope={scope}"]), steps=3)
    assert ctx.engine.compile and ctx.engine.compile_scope == scope
    assert (ctx.forward is not ctx.model) == (scope == "model")
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_serve_training_only(tiny_cfg):
    from torch._dynamo.utils import counters

    ctx = setup(tiny_cfg("sst2", "lora", overrides=["train.engine.compile=on", "model.tiny.num_hidden_layers=6"]))
    blocks = ctx.compiled.blocks
    assert len(blocks) == ctx.model.backbone.config.num_hidden_layers
    opt, sched = make_optimizer(ctx, 1e-3, 2)
    order = batch_order(ctx, ctx.cfg.train.batch_size, ctx.cfg.seed)
    before = counters["frames"]["ok"]
    train_step(ctx, order, 0, opt, sched)
    # One compilation serves every block (their code is shared): far fewer frames than blocks.
    assert 0 < counters["frames"]["ok"] - before < len(blocks)
    assert all(b._compiled_call_impl is None for b in blocks)  # off again after the step
    after_training = counters["frames"]["ok"]
    evaluate(ctx, "val")  # evaluation (and so snapshots) run the eager model: nothing compiles
    assert counters["frames"]["ok"] == after_training


def test_blocks_scope_names_the_option_when_a_model_has_no_blocks():
    with pytest.raises(ValueError, match="compile_scope=model"):
        repeated_blocks(torch.nn.Linear(2, 2))


def test_length_grouped_run_trains_and_logs(tiny_cfg):
    r = train_run(tiny_cfg("squad_v2", "full", overrides=["train.engine.group_by_length=on"]))
    log = [json.loads(x) for x in (Path(r["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in log) and r["padded_tokens"] >= r["tokens"] > 0


# ---------------------------------------------------------------------------------------------
# around the step


def test_log_is_appended_as_training_goes(tiny_cfg):
    cfg = tiny_cfg("sst2", "lora")  # log_every 2, 6 steps
    seen = {}

    def on_step(step, total):
        path = Path(cfg.out_dir).glob("runs/*/sst2/lora/seed42/log.jsonl")
        seen[step] = [json.loads(x)["step"] for x in next(path).read_text().splitlines()]

    train_run(cfg, on_step=on_step)
    assert seen[1] == [] and seen[2] == [2] and seen[5] == [2, 4] and seen[6] == [2, 4, 6]


def test_lora_under_bf16_autocast_copies_no_adapter_inputs(tiny_cfg):
    """The adapters' inputs are no longer cast to fp32 and back under bf16 autocast: same loss
    and gradients, bit for bit without dropout, with two fewer activation copies in the forward
    pass for each adapted projection whose input is bf16 (o_proj and down_proj; q/k/v/gate/up
    read the fp32 residual stream, which PEFT does not cast)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    cfg = tiny_cfg("sst2", "lora", overrides=["model.dtype=bfloat16", "method.lora.dropout=0"])
    results = {}
    for cast in (False, True):  # False: the engine's setting; True: PEFT's default
        ctx = setup(cfg)
        named = [(n, m) for n, m in ctx.model.named_modules() if isinstance(m, BaseTunerLayer)]
        adapted = [m for _, m in named]
        bf16_inputs = sum(n.endswith(("o_proj", "down_proj")) for n, _ in named)
        assert adapted and all(m.cast_input_dtype_enabled is False for m in adapted)
        for m in adapted:
            m.cast_input_dtype_enabled = cast
        order = batch_order(ctx, cfg.train.batch_size, cfg.seed)
        from loradrift.data import collate
        from loradrift.engine import _to_device

        batch = _to_device(ctx, collate([ctx.feats["train"][i] for i in order(0)], ctx.pad_id))
        with CountCopies() as copies, autocast(ctx):
            loss = ctx.model(batch)["loss"]
        loss.backward()
        grads = [p.grad.clone() for _, p in trainable_parameters(ctx.model)]
        results[cast] = (float(loss.detach()), grads, copies.n, bf16_inputs)
    (l0, g0, n0, k), (l1, g1, n1, _) = results[False], results[True]
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert k > 0 and n1 - n0 == 2 * k


def test_splits_are_tokenised_on_first_use(tiny_cfg):
    from loradrift.data import encode

    ctx = setup(tiny_cfg("squad_v2", "full"))
    assert set(ctx.feats) == {"train"}  # the engine needs the run's length; nothing else yet
    evaluate(ctx, "val")
    assert set(ctx.feats) == {"train", "val"}  # a search trial stops here: dev is never tokenised
    assert ctx.feats["dev"] == encode(ctx.spec, ctx.tokenizer, ctx.data.dev, ctx.cfg)


def test_untied_lm_head_is_frozen_in_full_fine_tuning(tiny_cfg):
    untied = setup(tiny_cfg("sst2", "full", overrides=["model.tiny.tie_word_embeddings=false"]))
    names = {n for n, _ in trainable_parameters(untied.model)}
    assert not any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)
    tied = setup(tiny_cfg("sst2", "full"))
    assert any("embed_tokens" in n for n, _ in trainable_parameters(tied.model))


def test_tiny_model_can_take_a_real_vocabulary(tiny_cfg):
    ctx = setup(tiny_cfg("sst2", "full", overrides=["model.tiny.vocab_size=5000"]))
    assert ctx.model.backbone.get_input_embeddings().weight.shape[0] == 5000


@pytest.mark.parametrize("background", [True, False])
def test_checkpoint_writer_copies_state_and_reports_failures(tmp_path, background):
    w = CheckpointWriter(background=background)
    t = torch.zeros(3)
    w.submit(tmp_path / "a.pt", {"t": t})
    t += 1  # training goes on: the file must hold the state at submit time
    w.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["t"], torch.zeros(3))
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):  # a folder in the way: the write fails, at once or at the next wait
        w.submit(tmp_path / "dir", {"t": t})
        w.wait()


# ---------------------------------------------------------------------------------------------
# heads


def test_heads_compute_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.long)
    for head in (ClassificationHead(16, 2), SpanAnswerabilityHead(16)):
        ref = head(hidden, mask, "last", {})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(hidden, mask, "last", {})
        for k in ref:
            assert out[k].dtype == torch.float32 and torch.equal(out[k], ref[k]), k


def test_span_loss_is_the_mean_over_answerable_windows():
    torch.manual_seed(0)
    head = SpanAnswerabilityHead(8)
    hidden, mask = torch.randn(4, 6, 8), torch.ones(4, 6, dtype=torch.long)
    labels = {"labels": torch.tensor([1, 0, 1, 0])}
    pos = {"start_positions": torch.tensor([1, -100, 2, -100]), "end_positions": torch.tensor([3, -100, 2, -100])}
    out = head(hidden, mask, "last", {**labels, **pos})
    sel = torch.tensor([True, False, True, False])
    ce = torch.nn.functional.cross_entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["has_logit"], labels["labels"].float())
    span = (ce(out["start_logits"][sel], pos["start_positions"][sel]) + ce(out["end_logits"][sel], pos["end_positions"][sel])) / 2
    assert torch.allclose(out["loss"], bce + span, atol=1e-6)
    none = {"start_positions": torch.full((4,), -100), "end_positions": torch.full((4,), -100)}
    assert torch.allclose(
        head(hidden, mask, "last", {"labels": torch.zeros(4, dtype=torch.long), **none})["loss"],
        torch.nn.functional.binary_cross_entropy_with_logits(out["has_logit"], torch.zeros(4)),
        atol=1e-6,
    )


def test_snapshots_are_extracted_without_tf32(tiny_cfg):
    from loradrift.representations import extract

    ctx = setup(tiny_cfg("sst2", "lora"))
    seen = []
    inner = ctx.model.layer_states

    def spy(ids, mask):
        assert not torch.is_grad_enabled()  # no autograd graph for a snapshot
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return inner(ids, mask)

    ctx.model.layer_states = spy
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the engine sets them on a GPU
    try:
        extract(ctx.model, ctx.feats["dev"][:4], 2, ctx.pad_id, ctx.device)
        assert seen and all(s == (False, False) for s in seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored for training
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
