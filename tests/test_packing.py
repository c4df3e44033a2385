"""Packed, prefix-shared batches: the rewards, loss and gradients of the plain two-sequence forward.

Float32 on CPU, a tiny Qwen3 with the real tokenizer, real hh-rlhf pairs tokenized by btrm (some with
their prompt truncated) and pairs whose answers share leading tokens.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from btrm.batching import (FLEX_BLOCK, MicroBatcher, collate_pairs, pack_groups, pack_pairs, pad_sequences, plan_by_tokens,
                           split_to, take)
from btrm.config import TrainConfig
from btrm.loss import bradley_terry_loss
from btrm.model import RewardModel, load_reward_model, packing_unsupported
from btrm.tokenize import PairTokenizer, TokenizationSpec, load_tokenizer

from conftest import free_port


def _objects(values) -> np.ndarray:
    """A numpy object array of lists, as Ray Data hands list columns over."""
    values = [list(v) for v in values]
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


@pytest.fixture(scope="module")
def pairs(tiny_qwen_dir, hh_helpful) -> dict[str, np.ndarray]:
    """Real pairs tokenized at max_length 160 (long prompts get cut), plus pairs whose answers start alike."""
    tokenizer = PairTokenizer(load_tokenizer(tiny_qwen_dir), TokenizationSpec(max_length=160))
    question = [{"role": "user", "content": "What is 2 + 2? Answer in one sentence."}]
    alike = [("The answer is 4.", "The answer is 5."), ("Four, because 2 + 2 = 4.", "Four, because I counted.")]
    conversations = [(p["chosen"], p["rejected"]) for p in hh_helpful["train"][:40]]
    conversations += [(question + [{"role": "assistant", "content": c}], question + [{"role": "assistant", "content": r}])
                      for c, r in alike]
    encoded = [tokenizer.encode_group(list(pair)) for pair in conversations]
    assert sum(e.truncated > 0 for e in encoded) >= 3
    sharing = encoded[-2:]
    # The answers' common leading tokens became part of the shared prompt, after the template's own.
    assert all(len(e.prompt_ids) > len(tokenizer.encode_conversations([question])[0]) for e in sharing)
    return {"prompt_ids": _objects(e.prompt_ids for e in encoded), "chosen_ids": _objects(e.tails[0] for e in encoded),
            "rejected_ids": _objects(e.tails[1] for e in encoded), "margin": np.linspace(0, 1, len(encoded), dtype=np.float32),
            "truncated": np.array([e.truncated for e in encoded])}


@pytest.fixture(scope="module")
def classifier(tiny_qwen_dir):
    return load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)


def _alone(classifier, prompt, tail) -> float:
    """The plain forward: one full sequence, no padding, no packing."""
    ids = torch.tensor([list(prompt) + list(tail)])
    with torch.no_grad():
        return classifier(input_ids=ids).logits.item()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rewards_equal_each_sequence_scored_alone(classifier, pairs, implementation):
    classifier.set_attn_implementation(implementation)
    if implementation == "eager":
        pairs = {k: v[-12:] for k, v in pairs.items()}  # eager materialises [heads, T, T] scores: keep T small
    batch = pack_pairs(pairs, classifier.config.pad_token_id)
    assert batch.computed_tokens == sum(len(p) + len(c) + len(r) for p, c, r in
                                        zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]))
    with torch.no_grad():
        chosen, rejected = batch.pair_rewards(RewardModel(classifier)(batch))
    for i in range(len(pairs["prompt_ids"])):
        assert chosen[i].item() == pytest.approx(_alone(classifier, pairs["prompt_ids"][i], pairs["chosen_ids"][i]), abs=2e-5)
        assert rejected[i].item() == pytest.approx(_alone(classifier, pairs["prompt_ids"][i], pairs["rejected_ids"][i]), abs=2e-5)


def _tiny_classifier(model_type: str, **options):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, n_layer=2, n_head=4, n_embd=32, d_model=32, n_layers=2, n_heads=4)
    config = AutoConfig.for_model(model_type, **sizes, **options, num_labels=1, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


GEMMA3 = {"text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8,
                          "pad_token_id": None},
          "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "image_size": 28, "patch_size": 14}, "mm_tokens_per_image": 4}


@pytest.mark.parametrize("model_type, options, refusal", [
    ("llama", {}, None),
    ("mistral", {"sliding_window": None}, None),
    ("mistral", {"sliding_window": 8}, "sliding-window attention (a window of 8 tokens)"),
    ("phi3", {"sliding_window": 8}, "sliding-window attention (a window of 8 tokens)"),
    ("starcoder2", {"sliding_window": 8}, "sliding-window attention (a window of 8 tokens)"),
    ("gemma2", {"sliding_window": 8, "head_dim": 8}, "no sdpa and FlexAttention kernels for gemma2"),
    ("gpt2", {}, "no sdpa and FlexAttention kernels for gpt2"),
    ("bloom", {}, "bloom positions tokens by their place in the row (ALiBi)"),
    ("mpt", {}, "mpt positions tokens by their place in the row (ALiBi)"),
    ("falcon", {"alibi": True}, "falcon positions tokens by their place in the row (ALiBi)"),
    # A composite config: the layers' attention is in its text config.
    ("gemma3", GEMMA3, "sliding-window attention layers (['sliding_attention'])"),
])
def test_packing_serves_only_architectures_it_computes_exactly(model_type, options, refusal):
    """What packing_unsupported lets through packs to the rewards of each sequence alone (sequences longer
    than the windows above, where a packed mask without the window would differ); the rest train padded."""
    classifier = _tiny_classifier(model_type, **options)
    reason = packing_unsupported(classifier)
    if refusal is not None:
        assert reason is not None and refusal in reason
        return
    assert reason is None
    classifier.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=generator).tolist() for n in (12, 5)]
    answers = [[torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths] for lengths in ((15, 9), (4, 11))]
    with torch.no_grad():
        packed = RewardModel(classifier)(pack_groups(prompts, answers, pad_token_id=0)).tolist()
    alone = [_alone(classifier, prompt, answer) for prompt, group in zip(prompts, answers) for answer in group]
    assert packed == pytest.approx(alone, abs=1e-5)


def test_a_composite_config_reads_each_reward_at_its_last_token_past_the_padding(tmp_path):
    """Gemma 3's classifier pools at its text config's pad token (the top-level config is not read)."""
    _tiny_classifier("gemma3", **GEMMA3).save_pretrained(tmp_path)
    classifier = load_reward_model(str(tmp_path), pad_token_id=0).eval()
    sequences = [[5, 6, 7, 8, 9, 10], [5, 6, 7]]
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id=0)
    with torch.no_grad():
        padded = classifier(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).tolist()
    assert padded == pytest.approx([_alone(classifier, s, []) for s in sequences], abs=1e-5)


def test_flex_attention_block_mask_gives_the_same_rewards(classifier, pairs):
    """The GPU path's BlockMask, run forward on CPU (FlexAttention has no CPU backward)."""
    classifier.set_attn_implementation("flex_attention")
    subset = {k: v[:8] for k, v in pairs.items()}
    batch = pack_pairs(subset, classifier.config.pad_token_id, pad_to_multiple=FLEX_BLOCK)
    assert batch.computed_tokens == batch.input_ids.shape[1] and batch.computed_tokens % FLEX_BLOCK == 0
    try:
        with torch.no_grad():
            packed = RewardModel(classifier)(batch)
    finally:
        classifier.set_attn_implementation("sdpa")
    classifier_rewards = [_alone(classifier, subset["prompt_ids"][i], subset[side][i])
                          for i in range(8) for side in ("chosen_ids", "rejected_ids")]
    assert packed.tolist() == pytest.approx(classifier_rewards, abs=2e-5)


def _layouts():
    """Rows that put block edges everywhere: many tiny groups to a block, prompts and answers spanning
    blocks, one-token answers, many candidates, parts ending exactly on a block edge, end padding."""
    generator = np.random.default_rng(0)
    layouts = [([128, 100], [[128, 128], [28, 100]]),  # edges on block boundaries, no padding
               ([300], [[1, 1, 1]]), ([5] * 30, [[3, 2]] * 30), ([1], [[640]]), ([3], [[2, 1]])]
    for prompt_range, answer_range, candidates in [((1, 40), (1, 40), (2, 2)), ((50, 400), (1, 300), (2, 2)),
                                                   ((1, 200), (1, 200), (1, 6)), ((100, 700), (100, 500), (2, 3))]:
        for _ in range(4):
            count = int(generator.integers(1, 12))
            layouts.append(([int(generator.integers(*prompt_range, endpoint=True)) for _ in range(count)],
                            [[int(generator.integers(*answer_range, endpoint=True))
                              for _ in range(int(generator.integers(*candidates, endpoint=True)))] for _ in range(count)]))
    return layouts


@pytest.mark.parametrize("prompt_lengths,answer_lengths", _layouts())
def test_block_mask_has_exactly_the_blocks_create_block_mask_finds(prompt_lengths, answer_lengths):
    """The BlockMask read off the layout against create_block_mask's, which evaluates the mask at every
    position: the same partial and full blocks for every query block, both ways (the backward reads KV→Q)."""
    from torch.nn.attention.flex_attention import create_block_mask

    prompts = [[7] * n for n in prompt_lengths]
    answers = [[[8] * n for n in lengths] for lengths in answer_lengths]
    batch = pack_groups(prompts, answers, pad_token_id=0, pad_to_multiple=FLEX_BLOCK)
    length = batch.input_ids.shape[1]
    # Two blocks at least: compiled kernels traced for dynamic lengths do not cover a row of one (another compile).
    assert length % FLEX_BLOCK == 0 and length >= 2 * FLEX_BLOCK
    ours = batch.block_mask()
    reference = create_block_mask(batch.mask_mod(), None, None, length, length, device="cpu")
    for counts, indices in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
        got, expected = getattr(ours, counts)[0, 0].tolist(), getattr(reference, counts)[0, 0].tolist()
        assert got == expected, counts
        blocks = lambda mask: [sorted(row[:n]) for row, n in zip(getattr(mask, indices)[0, 0].tolist(), got)]  # noqa: E731
        assert blocks(ours) == blocks(reference), indices


def test_a_prompt_with_many_candidates_is_computed_once(classifier):
    classifier.set_attn_implementation("sdpa")
    prompt, candidates = [5, 6, 7, 8, 9], [[10], [11, 12], [13, 14, 15], [10, 16]]
    batch = pack_groups([prompt, [20, 21]], [candidates, [[22], [23]]], classifier.config.pad_token_id)
    assert batch.computed_tokens == 5 + 8 + 2 + 2 and batch.num_tokens == 4 * 5 + 8 + 2 * 2 + 2
    with torch.no_grad():
        rewards = RewardModel(classifier)(batch).tolist()
    expected = [_alone(classifier, prompt, c) for c in candidates] + [_alone(classifier, [20, 21], [t]) for t in (22, 23)]
    assert rewards == pytest.approx(expected, abs=2e-5)


def _gradients(model: RewardModel, batches, count: int, use_margin: bool) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    total = 0.0
    for batch in batches:
        chosen, rejected = batch.pair_rewards(model(batch))
        loss = bradley_terry_loss(chosen, rejected, batch.margin if use_margin else None, 0.1, reduction="sum") / count
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("use_margin", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_forward(classifier, pairs, use_margin):
    """One padded batch of every pair vs the same pairs packed under a token budget into several
    micro-batches whose gradients accumulate: the same loss and the same gradient, to float32 rounding."""
    classifier.set_attn_implementation("sdpa")
    model = RewardModel(classifier).train()
    count = len(pairs["prompt_ids"])
    padded_loss, padded = _gradients(model, [collate_pairs(pairs, classifier.config.pad_token_id)], count, use_margin)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])]
    plan = plan_by_tokens(lengths, 640)
    assert len(plan) > 3
    micro = [pack_pairs({k: v[indices] for k, v in pairs.items()}, classifier.config.pad_token_id) for indices in plan]
    packed_loss, packed = _gradients(model, micro, count, use_margin)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for p, q in zip(packed, padded):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_token_budget_plans_are_full_and_can_be_split_to_match_other_workers():
    lengths = [300, 20, 500, 120, 80, 480, 60, 1000]
    plan = plan_by_tokens(lengths, 512)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 512 for b in plan if len(b) > 1)  # the 1000-token pair goes alone
    # First-fit decreasing: the longest first, each into the first micro-batch with room.
    assert plan == [[7], [2], [1, 5], [0, 3, 4], [6]]
    more = split_to(plan, 7, lengths)
    assert len(more) == 7 and sorted(i for b in more for i in b) == list(range(8))
    with pytest.raises(ValueError, match="cannot cut 8 items into 9"):
        split_to(plan, 9, lengths)


def test_padded_micro_batches_take_the_pairs_in_order_of_length(pairs):
    batcher = MicroBatcher(packed=False, pad_token_id=0, max_tokens=0, pairs_per_batch=7)
    lengths = batcher.lengths(pairs)
    plan = batcher.plan(lengths)
    assert [len(b) for b in plan] == [7] * 6 and sorted(i for b in plan for i in b) == list(range(42))
    assert all(min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter) for longer, shorter in zip(plan, plan[1:]))
    computed = lambda cut: sum(batcher.collate(take(pairs, b)).computed_tokens for b in cut)  # noqa: E731
    assert computed(plan) < 0.95 * computed([list(range(s, s + 7)) for s in range(0, 42, 7)])  # many are at max_length


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as a Ray Train worker has, for DeepSpeed engines in this process."""
    with pytest.MonkeyPatch.context() as environment:  # later subprocesses must not see a distributed job
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                                LOCAL_RANK="0").items():
            environment.setenv(name, value)
        dist.init_process_group("gloo")
        yield
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_step_on_packed_pairs_equals_padded(process_group, tiny_qwen_dir, pairs, stage):
    """The real training step (DeepSpeed engine, micro-batches, one optimizer step) on packed and on
    padded pairs: the same loss, and after the step the same loss again (so the same update)."""
    from btrm.train_loop import build_engine, micro_batcher, train_step

    losses = {}
    for packing in (True, False):
        classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)
        config = TrainConfig(train_set_path="unused", max_length=160, max_tokens_per_batch=640, packing=packing,
                             per_device_train_batch_size=7, gradient_accumulation_steps=6, deepspeed=stage,
                             learning_rate=1e-3, warmup_ratio=0.0, gradient_checkpointing=True,
                             use_margin=True, center_rewards_coefficient=0.1)
        if packing:  # the loss the step must report: the mean over all pairs, margin and centring included
            with torch.no_grad():
                chosen, rejected = RewardModel(classifier).eval()(pack_pairs(
                    pairs, classifier.config.pad_token_id)).view(-1, 2).unbind(1)
            expected = bradley_terry_loss(chosen, rejected, torch.from_numpy(pairs["margin"]), 0.1, reduction="sum").item()
            # And the gradient: the plain backward of the mean loss over the step's pairs. (The loss after one
            # AdamW step would not show a gradient scaled wrongly as a whole: Adam's first update is its sign.)
            chosen, rejected = RewardModel(classifier).eval()(pack_pairs(
                pairs, classifier.config.pad_token_id)).view(-1, 2).unbind(1)
            bradley_terry_loss(chosen, rejected, torch.from_numpy(pairs["margin"]), 0.1).backward()
            expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in classifier.parameters()])).item()
            classifier.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
            engine = build_engine(classifier, config, use_gpu=False, total_steps=2)
        assert classifier.is_activation_checkpointing
        batcher = micro_batcher(classifier, config, classifier.config.pad_token_id, config.per_device_train_batch_size)
        first = train_step(engine, pairs, batcher, config)
        assert engine.get_global_grad_norm() == pytest.approx(expected_norm, rel=1e-4)  # before clipping, as logged
        second = train_step(engine, pairs, batcher, config)
        assert first["pairs"] == len(pairs["prompt_ids"]) and engine.global_steps == 2
        losses[packing] = (first["loss"], second["loss"], first["computed_tokens"], first["micro_batches"])
    assert losses[True][0] == pytest.approx(expected, rel=1e-5)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-4)
    assert losses[True][1] != pytest.approx(losses[True][0], rel=1e-4)  # the step did update the weights
    assert losses[True][2] < 0.75 * losses[False][2]  # no padding, the prompt once
    assert losses[False][3] == 6 and losses[True][3] >= 2


def test_bf16_steps_sum_the_micro_batch_gradients_in_float32_under_the_shipped_zero_configs(process_group, tiny_qwen_dir,
                                                                                           pairs):
    """The reference's step, one pair a micro-batch over many, in bfloat16 (here on CPU, enabled in the config):
    under a shipped ZeRO config the step's gradient is the float32 sum of the micro-batches' bf16 gradients,
    not DeepSpeed's default, a bf16 sum rounded at every micro-batch."""
    from deepspeed.utils import safe_get_full_grad

    from btrm.deepspeed_configs import load_deepspeed_config
    from btrm.train_loop import build_engine, micro_batcher, train_step

    count = len(pairs["prompt_ids"])
    classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)
    for parameter in classifier.parameters():  # as DeepSpeed's bf16 casts: the weights, not the buffers (RoPE's)
        parameter.data = parameter.data.bfloat16()
    summed = [torch.zeros(p.shape) for p in classifier.parameters()]
    for k in range(count):
        chosen, rejected = RewardModel(classifier)(collate_pairs(take(pairs, [k]), classifier.config.pad_token_id))
        (bradley_terry_loss(chosen, rejected, reduction="sum") / count).backward()
        for total, parameter in zip(summed, classifier.parameters()):
            total += parameter.grad.float()
        classifier.zero_grad(set_to_none=True)
    float32_sum = torch.cat([total.flatten() for total in summed])

    def step_error(stage: str, grad_accum_dtype: str) -> float:
        classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)
        config = TrainConfig(train_set_path="unused", max_length=160, packing=False, per_device_train_batch_size=1,
                             gradient_accumulation_steps=count, gradient_checkpointing=False, deepspeed=stage)
        shipped = load_deepspeed_config(stage)
        assert shipped["data_types"] == {"grad_accum_dtype": "fp32"}
        engine = build_engine(classifier, config, use_gpu=False, total_steps=1, deepspeed_config={
            **shipped, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": grad_accum_dtype}})
        step, gradient = engine.step, []

        def step_keeping_the_gradient():  # read before the step: it clears the gradients
            gradient.extend(safe_get_full_grad(p).float().flatten() for p in engine.module.parameters())
            step()

        engine.step = step_keeping_the_gradient
        result = train_step(engine, pairs, micro_batcher(classifier, config, classifier.config.pad_token_id, 1), config)
        assert result["micro_batches"] == count and engine.global_steps == 1
        return ((torch.cat(gradient) - float32_sum).norm() / float32_sum.norm()).item()

    summed_in_bf16 = step_error("zero2", "bf16")  # (the same under every stage)
    assert summed_in_bf16 > 1e-3
    # Exact under ZeRO-2/3 (1e-9); ZeRO-1's bf16 optimizer keeps a fifth of the bf16 sum's rounding.
    assert {stage: step_error(stage, "fp32") < summed_in_bf16 / 3 for stage in ("zero1", "zero2", "zero3")} == \
        {"zero1": True, "zero2": True, "zero3": True}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_exactly_and_compile_once_for_every_layer_and_row_length(process_group, tiny_qwen_dir,
                                                                                       pairs, checkpointing):
    """The step with each decoder layer compiled (the GPU default; here with sdpa) against the same step
    uncompiled: the same losses over three steps whose rows differ in length, and one graph for all of it,
    every layer and every length (a model of 28 layers that compiled once per layer would stop compiling at
    torch's limit of 8 and run the rest eager)."""
    from torch._dynamo.utils import counters

    from btrm.train_loop import build_engine, micro_batcher, train_step

    losses = {}
    for compile_layers in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)
        config = TrainConfig(train_set_path="unused", max_length=160, max_tokens_per_batch=640, per_device_train_batch_size=14,
                             gradient_accumulation_steps=1, deepspeed="zero2", learning_rate=1e-3, warmup_ratio=0.0,
                             gradient_checkpointing=checkpointing, compile_layers=compile_layers)
        engine = build_engine(classifier, config, use_gpu=False, total_steps=3)
        batcher = micro_batcher(classifier, config, classifier.config.pad_token_id, config.per_device_train_batch_size)
        steps = [train_step(engine, take(pairs, range(start, start + 14)), batcher, config) for start in (0, 14, 28)]
        losses[compile_layers] = [step["loss"] for step in steps]
        graphs = counters["stats"]["unique_graphs"]
    assert len({step["computed_tokens"] for step in steps}) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    assert graphs == 1


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3"])
def test_a_resumed_engine_trains_on_the_schedule_of_its_own_options(process_group, tiny_qwen_dir, pairs, tmp_path, stage):
    """A finished 3-step run extended to 6 steps with another learning rate and weight decay: after loading its
    checkpoint, step 4 trains at the rate a fresh 6-step run of the new options has at step 4 (not the old
    schedule's last rate, 0), and the decay group decays by the new weight decay."""
    from btrm.train_loop import CHECKPOINT_TAG, build_engine, follow_schedule, micro_batcher, train_step

    def engine_for(total_steps, **options):
        classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id)
        config = TrainConfig(train_set_path="unused", max_length=160, per_device_train_batch_size=14,
                             gradient_accumulation_steps=1, deepspeed=stage, warmup_ratio=0.2, **options)
        engine = build_engine(classifier, config, use_gpu=False, total_steps=total_steps)
        return engine, micro_batcher(classifier, config, classifier.config.pad_token_id, 14), config

    engine, batcher, config = engine_for(3, learning_rate=1e-3)
    for start in (0, 14, 28):
        train_step(engine, take(pairs, range(start, start + 14)), batcher, config)
    assert engine.get_lr() == [0.0, 0.0]  # a finished linear schedule
    engine.save_checkpoint(str(tmp_path), tag=CHECKPOINT_TAG)

    fresh, _, _ = engine_for(6, learning_rate=5e-4, weight_decay=0.1)
    for _ in range(3):  # the rate of the new options' schedule at step 4, as an uninterrupted run would have it
        fresh.lr_scheduler.step()
    resumed, batcher, config = engine_for(6, learning_rate=5e-4, weight_decay=0.1)
    resumed.load_checkpoint(str(tmp_path), tag=CHECKPOINT_TAG)
    follow_schedule(resumed, config)
    assert resumed.global_steps == 3
    assert resumed.get_lr() == pytest.approx(fresh.get_lr()) and resumed.get_lr()[0] > 0
    assert [group["weight_decay"] for group in resumed.optimizer.param_groups] == [0.1, 0.0]
    train_step(resumed, take(pairs, range(14)), batcher, config)
    fresh.lr_scheduler.step()
    assert resumed.get_lr() == pytest.approx(fresh.get_lr())  # and it goes on along that schedule


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: FlexAttention trains only on CUDA")
def test_on_the_gpu_bf16_packed_flex_is_as_close_to_float32_as_the_plain_bf16_forward(tiny_qwen_dir, pairs):
    """Rewards and gradients of the packed FlexAttention forward in bf16 against float32: no further from
    it than the plain padded forward in bf16 is (twice its error, plus rounding slack)."""

    def run(dtype: torch.dtype, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        classifier = load_reward_model(tiny_qwen_dir, load_tokenizer(tiny_qwen_dir).pad_token_id, dtype=dtype).cuda()
        classifier.set_attn_implementation("flex_attention" if packed else "sdpa")
        model = RewardModel(classifier).train()
        pad = classifier.config.pad_token_id
        batch = (pack_pairs(pairs, pad, pad_to_multiple=FLEX_BLOCK) if packed else collate_pairs(pairs, pad)).to("cuda")
        chosen, rejected = batch.pair_rewards(model(batch))
        bradley_terry_loss(chosen, rejected).backward()
        gradient = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        return torch.cat([chosen, rejected]).detach().float(), gradient

    reference, reference_gradient = run(torch.float32, packed=False)
    plain, plain_gradient = run(torch.bfloat16, packed=False)
    packed, packed_gradient = run(torch.bfloat16, packed=True)
    plain_error = (plain - reference).abs().max().item()
    assert (packed - reference).abs().max().item() <= 2 * plain_error + 1e-3
    relative = lambda g: ((g - reference_gradient).norm() / reference_gradient.norm()).item()  # noqa: E731
    assert relative(packed_gradient) <= 2 * relative(plain_gradient) + 1e-3


@pytest.mark.parametrize("stage", ["zero3", "zero3_offload"])
def test_zero3_builds_the_model_partitioned_and_still_decays_its_matrices(process_group, tiny_qwen_dir, pairs, stage):
    """Under ZeRO-3 a worker builds the model already partitioned (deepspeed.zero.Init): its parameters are
    placeholders, DeepSpeed holds the shares. The optimizer still tells matrices (decayed) from vectors by their
    own shapes, and a model loaded afterwards in the same process is loaded whole."""
    from btrm.deepspeed_configs import load_deepspeed_config
    from btrm.train_loop import Plan, _optimizer, load_classifier

    pad = load_tokenizer(tiny_qwen_dir).pad_token_id
    config = TrainConfig(train_set_path="unused", deepspeed=stage, weight_decay=0.1)
    plan = Plan(config=config, model_path=tiny_qwen_dir, tokenization={}, deepspeed_config=load_deepspeed_config(stage),
                use_gpu=False, total_steps=1, steps_per_epoch=1, eval_shards=[], ledgers={}, tracker_run_id="unused")
    partitioned = load_classifier(plan, pad)
    whole = load_reward_model(tiny_qwen_dir, pad)
    assert all(p.numel() == 0 for p in partitioned.parameters())
    assert [p.ds_numel for p in partitioned.parameters()] == [p.numel() for p in whole.parameters()]
    assert not any(hasattr(p, "ds_shape") for p in whole.parameters())
    decay, no_decay = (group["params"] for group in _optimizer(RewardModel(partitioned), config, False).param_groups)
    expected, _ = (group["params"] for group in _optimizer(RewardModel(whole), config, False).param_groups)
    assert [tuple(p.ds_shape) for p in decay] == [tuple(p.shape) for p in expected] and len(decay) > 10 and no_decay
    # And DeepSpeed trains it as it is (a step's loss is the whole model's: the same as an engine of it loaded whole).
    from btrm.train_loop import build_engine, micro_batcher, train_step

    step = dict(max_length=160, per_device_train_batch_size=14, gradient_accumulation_steps=1)
    losses = []
    for classifier in (partitioned, load_reward_model(tiny_qwen_dir, pad)):
        options = TrainConfig(train_set_path="unused", deepspeed=stage, **step)
        engine = build_engine(classifier, options, use_gpu=False, total_steps=1, deepspeed_config=plan.deepspeed_config)
        losses.append(train_step(engine, take(pairs, range(14)), micro_batcher(classifier, options, pad, 14), options)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_diverged_model_is_told_by_its_weights_or_a_probe_forward(process_group, tiny_qwen_dir):
    """What the driver reads to publish no diverged model: weight tensors holding NaN or infinities, and the reward
    of a one-token conversation (NaN where the weights overflow every forward). Not a loss: one overflowing
    micro-batch (a step DeepSpeed skips) would withhold a sound model."""
    from btrm.train import unusable_model
    from btrm.train_loop import NON_FINITE_TENSORS, PROBE_REWARD, build_engine, diverged_figures, micro_batcher

    pad = load_tokenizer(tiny_qwen_dir).pad_token_id
    classifier = load_reward_model(tiny_qwen_dir, pad)
    config = TrainConfig(train_set_path="unused", deepspeed="zero2")
    engine = build_engine(classifier, config, use_gpu=False, total_steps=1)
    batcher = micro_batcher(classifier, config, pad, 4)
    sound = diverged_figures(engine, engine.module.classifier.state_dict(), batcher)
    assert sound[NON_FINITE_TENSORS] == 0 and math.isfinite(sound[PROBE_REWARD])
    assert unusable_model({**sound, "eval/loss": float("nan"), "train/loss": float("inf")}) is None
    with torch.no_grad():
        engine.module.classifier.score.weight[0, 3] = float("inf")
    broken = diverged_figures(engine, engine.module.classifier.state_dict(), batcher)
    assert broken[NON_FINITE_TENSORS] == 1 and not math.isfinite(broken[PROBE_REWARD])
    assert unusable_model(broken) == "1 weight tensor(s) of the trained model hold NaN or infinite values"
    assert unusable_model({NON_FINITE_TENSORS: 0, PROBE_REWARD: float("nan")}).startswith(
        "the trained model scores a one-token conversation nan")
    assert unusable_model({}) is None  # (a report without the figures)
    # Some eval pairs overflowing is the data's doing; all of them, the model's.
    assert unusable_model({**sound, "eval/pairs": 40, "eval/non_finite_pairs": 3}) is None
    assert unusable_model({**sound, "eval/pairs": 40, "eval/non_finite_pairs": 40}) == \
        "the trained model scores none of the 40 eval pairs as finite numbers"
