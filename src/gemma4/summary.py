"""What a checkpoint is: variant, layer plan, parameters by component, bytes by dtype."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from .config import ModelConfig
from .plan import build_plan
from .weights.layout import COMPONENTS, TensorSpec, checkpoint_tensors
from .weights.presets import PRESETS

# The fields that tell the released models apart.
_SIGNATURE = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "enable_moe_block")


def variant_name(config: ModelConfig) -> str:
    text = config.text
    for name, raw in PRESETS.items():
        preset = raw.get("text_config", raw)
        if all(preset.get(f, False) == getattr(text, f) for f in _SIGNATURE):
            return name
    return "custom"


def parameter_counts(specs: list[TensorSpec]) -> dict[str, int]:
    counts = Counter({c: 0 for c in COMPONENTS})
    for spec in specs:
        counts[spec.component] += spec.numel
    return dict(counts)


def summarize(config: ModelConfig, bytes_by_dtype: dict[str, int] | None = None) -> dict[str, Any]:
    """A JSON-able description; `bytes_by_dtype`: what the files hold, by stored dtype."""
    specs = checkpoint_tensors(config)
    text = config.text
    summary: dict[str, Any] = {
        "variant": variant_name(config),
        "model_type": config.model_type,
        "encoders": [e for e, c in (("vision", config.vision), ("audio", config.audio)) if c is not None],
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "context": text.max_position_embeddings,
        "final_logit_softcapping": text.final_logit_softcapping,
        "layers": [_layer_row(p) for p in build_plan(text)],
        "parameters": parameter_counts(specs),
        "total_parameters": sum(s.numel for s in specs),
    }
    if bytes_by_dtype is not None:
        summary["bytes_by_dtype"] = bytes_by_dtype
    return summary


def _layer_row(plan: Any) -> dict[str, Any]:
    row = asdict(plan)
    row["rope"] = {"theta": plan.rope.theta, "rotated_fraction": plan.rope.rotated_pairs / (plan.head_dim // 2)}
    return row


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"variant       {summary['variant']} ({summary['model_type']}"
        + (f", with {' and '.join(summary['encoders'])} encoder{'s' * (len(summary['encoders']) > 1)})" if summary["encoders"] else ", text only)"),
        f"hidden        {summary['hidden_size']}   vocab {summary['vocab_size']}   context {summary['context']}"
        f"   logit soft-cap {summary['final_logit_softcapping']}",
        "",
        "layer  type     window  heads/kv  head_dim  kv from  mlp     moe  ple  rope",
    ]
    for row in summary["layers"]:
        kv_from = "own" if row["kv_source"] == row["index"] else f"L{row['kv_source']}"
        kind = "sliding" if row["attention_type"] == "sliding_attention" else "global"
        kind += "*" if row["k_eq_v"] else ""
        rope = f"{row['rope']['theta']:.0e} x{row['rope']['rotated_fraction']:.2f}"
        lines.append(
            f"{row['index']:>5}  {kind:<8} {str(row['sliding_window'] or '-'):>6}  {row['num_heads']:>4}/{row['num_kv_heads']:<3}"
            f"  {row['head_dim']:>8}  {kv_from:>7}  {row['mlp_width']:<6}  {'yes' if row['moe'] else 'no':<3}  "
            f"{row['ple_dim'] or '-':<3}  {rope}"
        )
    if any(row["k_eq_v"] for row in summary["layers"]):
        lines.append("(* = K=V: keys and values from one projection)")
    lines += ["", "parameters"]
    total = summary["total_parameters"]
    for component, count in summary["parameters"].items():
        if count:
            lines.append(f"  {component:<11} {count:>15,}  {100 * count / total:5.1f} %")
    lines.append(f"  {'total':<11} {total:>15,}")
    if "bytes_by_dtype" in summary:
        lines += ["", "bytes on disk"] + [f"  {d:<11} {b:>15,}" for d, b in summary["bytes_by_dtype"].items()]
    return "\n".join(lines)
