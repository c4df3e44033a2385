"""DeepSpeed configs btrm ships (``--deepspeed zero2``) and the filling of their "auto" values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIPPED = {p.stem: p for p in Path(__file__).parent.glob("*.json")}
FLOAT32_NAMES = ("fp32", "float32", "float", "torch.float32")  # what DeepSpeed's DtypeEnum reads as float32


def load_deepspeed_config(name_or_path: str) -> dict[str, Any]:
    path = SHIPPED.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {name_or_path}: neither a shipped config ({sorted(SHIPPED)}) nor a JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({e})") from e


def fill_deepspeed_config(raw: dict[str, Any], *, micro_batch: int, accumulation: int, world_size: int,
                          max_grad_norm: float, bf16: bool, hidden_size: int) -> dict[str, Any]:
    """Replaces "auto" with values derived from the job's options (as the transformers integration does)."""
    config = json.loads(json.dumps(raw))
    given = [key for key in ("optimizer", "scheduler") if key in config]
    if given:
        raise ValueError(f"DeepSpeed config: btrm builds the optimizer and schedule from its options (--learning_rate, "
                         f"--weight_decay, --lr_scheduler_type, --warmup_ratio): remove the {given} section(s)")
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ValueError(f"DeepSpeed config sets {key}={config[key]} but the job's options give {value}; "
                             "set it to \"auto\" or make them agree")
    config.setdefault("bf16", {})["enabled"] = bf16_enabled(config, bf16)
    if config.get("fp16", {}).get("enabled") == "auto":  # (Hugging Face's templates: it follows --fp16, which btrm
        config["fp16"]["enabled"] = False               # has not: bf16 is its half precision)
    if config["bf16"]["enabled"] and config.get("fp16", {}).get("enabled"):
        raise ValueError("DeepSpeed config: fp16 and bf16 both enabled (bf16 \"auto\" follows --bf16): enable one")
    zero = config.setdefault("zero_optimization", {"stage": 0})
    if (config["bf16"]["enabled"] and zero.get("stage", 0) == 0
            and config.get("data_types", {}).get("grad_accum_dtype") in FLOAT32_NAMES):
        raise ValueError("DeepSpeed config: data_types.grad_accum_dtype fp32 with bf16 needs ZeRO (stage 1-3): DeepSpeed "
                         "refuses it at stage 0; remove data_types or use a ZeRO stage")
    zero_auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in zero_auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # DeepSpeed refuses a client optimizer beside an offloaded one unless told it is meant: the Adam step
        # of the CPU-held fp32 weights is then torch's AdamW there (no DeepSpeedCPUAdam build needed).
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    leftover = [k for k, v in _walk(config) if v == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed config: btrm cannot fill \"auto\" for {leftover}; give values")
    return config


def bf16_enabled(raw: dict[str, Any], bf16: bool) -> bool:
    """Whether the engine trains in bf16: ``bf16`` (--bf16 on GPUs) unless the config says itself (not "auto")."""
    enabled = raw.get("bf16", {}).get("enabled", "auto")
    return bf16 if enabled == "auto" else bool(enabled)


def precision_note(filled: dict[str, Any], *, use_gpu: bool, bf16_asked: bool, deepspeed: str,
                   pairs_per_step: int) -> str | None:
    """What the engine trains in, said where the options alone would mislead. CPU workers: --bf16 (GPUs only) or a
    config of the user's that enables a half precision itself. GPUs in bf16: a config that sums a step's
    micro-batch gradients in bfloat16 (DeepSpeed's default, rounding the sum at every micro-batch)."""
    if not use_gpu:
        for half in ("bf16", "fp16"):
            if filled.get(half, {}).get("enabled"):
                return f"--deepspeed {deepspeed} enables {half}: these CPU workers train in {half}"
        return "--bf16 needs GPUs; these CPU workers train in float32" if bf16_asked else None
    if (not filled["bf16"]["enabled"] or pairs_per_step == 1  # (one pair: one micro-batch, nothing summed)
            or filled.get("data_types", {}).get("grad_accum_dtype") in FLOAT32_NAMES):
        return None
    summed = f"note: --deepspeed {deepspeed} with bf16 sums the gradients of a step's micro-batches in bfloat16"
    if filled["zero_optimization"].get("stage", 0) == 0:
        return f"{summed} (DeepSpeed sums in float32 under ZeRO only): --deepspeed zero1 or zero2 sum them in float32"
    return f'{summed}: its "data_types": {{"grad_accum_dtype": "fp32"}} (as btrm\'s zero1-3 have) sums them in float32'


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node
