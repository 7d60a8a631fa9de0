"""The policy node's /diagnostics: one DiagnosticStatus per concern.

- `<node>: policy`: lifecycle state (rclpy's state machine), model, rates, counters, latency
  percentiles per stage, and the deadline view: the last chunk's latency against
  `latency_budget_ms` and the number of misses (WARN while misses are recent);
- `<node>: inputs`: per-source counters, every failure class, and per camera the age of its
  newest frame: WARN once older than image_timeout_s (no action can come from it), ERROR once
  older than 3 x image_timeout_s (the camera is gone), so a camera that simply stops
  publishing is never reported healthy;
- `<node>: resources`: memory and the power source / energy per chunk.
"""

from __future__ import annotations

from quantvla_ros.diagnostics import ERROR, OK, WARN, make_status

# Latency stages reported in diagnostics (model stages come from ActionChunk.timings_ms).
STAGES = ("preprocess", "vision_prefix", "denoise", "postprocess", "total", "node_overhead", "end_to_end")
CAMERA_LOST_FACTOR = 3.0  # a camera silent this many image timeouts is ERROR, not WARN


def recent_window_s(node) -> float:
    """A problem keeps its level for a few periods, so a one-off burst is seen by monitors."""
    return max(3.0 * node.get_parameter("diagnostics_period_s").value, 2.0)


def policy_status(node):
    name = f"{node.get_name()}: policy"
    policy = node._policy
    desc = node._describe if policy is not None else {}
    counters = node._counters
    state = node.lifecycle_state
    values = {
        "lifecycle_state": state,
        "model": node.get_parameter("model").value,
        "device": node.get_parameter("device").value,
        "scheme": desc.get("scheme", "n/a"),
        "weight_bytes": desc.get("weight_bytes", "n/a"),
        "weight_mib": (desc["weight_bytes"] / 2**20 if isinstance(desc.get("weight_bytes"), (int, float)) else "n/a"),
        "dry_run": bool(node._live("dry_run")),
        "chunk_aggregation": node._live("chunk_aggregation"),
        "smoothing_steps": node._live("smoothing_steps"),
        "inference_rate_hz": node._rate.rate_hz(),
        "chunks_computed": counters.get("chunks_computed"),
        "chunks_published": counters.get("chunks_published"),
        "chunks_clipped": counters.get("chunks_clipped"),
        "chunks_refused_limits": counters.get("chunks_refused_limits"),
        "chunks_dropped_stale": counters.get("chunks_dropped_stale"),
        "inference_errors": counters.get("inference_error"),
        "last_blended_steps": node._last_blended,
        "model_max_text_tokens": (getattr(policy.config, "max_text_tokens", "n/a") if policy is not None else "n/a"),
        "latency_samples": node._latency.count("total"),
    }
    values.update(node._deadline.values())
    for stage in STAGES:
        pct = node._latency.percentiles(stage)
        for p in (50, 90, 99):
            values[f"{stage}_ms_p{p}"] = pct[p] if pct else "n/a"
    if node._config_error:
        return make_status(name, values["device"], ERROR, f"configure failed: {node._config_error}", values)
    if counters.recent("inference_error", 5.0):
        return make_status(name, values["device"], ERROR, "inference failing", values)
    if state == "active" and node._deadline.missed_within(recent_window_s(node)):
        d = node._deadline
        return make_status(
            name,
            values["device"],
            WARN,
            (
                f"deadline missed: last chunk {d.last_ms:.1f} ms vs budget {d.last_budget_ms:.1f} ms "
                f"({d.misses} misses of {d.chunks} chunks)"
            ),
            values,
        )
    return make_status(name, values["device"], OK, state, values)


def _camera_problems(node, values: dict) -> tuple[list[str], list[str]]:
    """Per-camera age values; (cameras lost -> ERROR, cameras stale -> WARN)."""
    gate = node._gate
    topics = node._cfg.get("camera_topics", node.get_parameter("camera_topics").value)
    if gate is None:
        for cam in range(len(topics)):
            values[f"camera{cam}_age_s"] = "n/a (not configured)"
        return [], []
    timeout = node._live("image_timeout_s")
    lost, stale = [], []
    for cam, (age, ever) in enumerate(gate.camera_ages(node._now_s())):
        values[f"camera{cam}_age_s"] = age if ever else f"no frame for {age:.3f}"
        values[f"camera{cam}_rate_hz"] = gate.rates[cam].rate_hz()
        if node.lifecycle_state != "active" or timeout <= 0:
            continue
        if age > CAMERA_LOST_FACTOR * timeout:
            lost.append(
                f"camera{cam} ({topics[cam]}) " + (f"silent for {age:.1f} s" if ever else f"no frame in {age:.1f} s")
            )
        elif age > timeout:
            stale.append(f"camera{cam} ({topics[cam]}) newest frame {age:.2f} s old")
    return lost, stale


def inputs_status(node):
    name = f"{node.get_name()}: inputs"
    values = {}
    topics = node._cfg.get("camera_topics", node.get_parameter("camera_topics").value)
    gate = node._gate
    dropped = gate.frames.dropped if gate is not None else [0] * len(topics)
    counts = dict(node._counters.items())
    for cam, topic in enumerate(topics):
        src = f"camera{cam}"
        values[f"{src}_topic"] = topic
        values[f"{src}_received"] = counts.get(f"received.{src}", 0)
        values[f"{src}_dropped"] = dropped[cam] if cam < len(dropped) else 0
        values[f"{src}_stale"] = sum(v for k, v in counts.items() if k.startswith(f"stale.{src}."))
        values[f"{src}_invalid"] = sum(v for k, v in counts.items() if k.startswith(f"invalid.{src}."))
    lost, stale_cams = _camera_problems(node, values)
    values["unmatched_frame_sets"] = counts.get("unmatched", 0)
    for src in ("instruction", "joint_state"):
        values[f"{src}_received"] = counts.get(f"received.{src}", 0)
        values[f"{src}_stale"] = sum(v for k, v in counts.items() if k.startswith(f"stale.{src}."))
        values[f"{src}_invalid"] = sum(v for k, v in counts.items() if k.startswith(f"invalid.{src}."))
    values["instruction_repeats"] = counts.get("repeated.instruction", 0)
    if gate is not None:
        for src, age in gate.input_ages(node._now_s()).items():
            values[f"{src}_age_s"] = age if age is not None else "n/a (none valid)"
    values["model_output_refused"] = sum(v for k, v in counts.items() if k.startswith("invalid.model."))
    for key, value in counts.items():  # every failure class, e.g. invalid.camera0.truncated
        if key.startswith(("invalid.", "stale.")):
            values[key] = value
    text = gate.instruction_text() if gate is not None else None
    values["instruction"] = text if text is not None else "(none)"
    # the model reads a bounded prompt: compare with the policy status' model_max_text_tokens
    values["instruction_utf8_bytes"] = len(text.encode("utf-8")) if text else 0
    values["last_problem"] = node._last_problem or "(none)"
    window = recent_window_s(node)
    recent_invalid = node._counters.recent("invalid.", window)
    recent_stale = node._counters.recent("stale.", window)
    parts = (
        ([f"camera lost: {', '.join(lost)}"] if lost else [])
        + ([f"camera stale: {', '.join(stale_cams)}"] if stale_cams else [])
        + ([f"invalid input: {', '.join(recent_invalid)}"] if recent_invalid else [])
        + ([f"stale or missing input: {', '.join(recent_stale)}"] if recent_stale else [])
    )
    if parts:
        level = ERROR if (lost or recent_invalid) else WARN
        return make_status(name, "", level, "; ".join(parts), values)
    return make_status(name, "", OK, "inputs ok", values)


def resources_status(node):
    name = f"{node.get_name()}: resources"
    device = str(node._cfg.get("device", node.get_parameter("device").value))
    values = {}
    if device.startswith("cuda") and node._policy is not None:
        import torch

        values["gpu_memory_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        values["gpu_memory_reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
        values["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        values["gpu_memory_allocated_mib"] = f"n/a (device {device})"
    try:
        import psutil

        values["process_rss_mib"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        values["process_rss_mib"] = "n/a (psutil not installed)"
    meter = node._energy
    if meter is None or not meter.available:
        values["power_source"] = "unavailable"
        values["power_note"] = node._power_note or "not configured"
        values["power_w"] = "unavailable"
        values["energy_per_chunk_j"] = "unavailable"
    else:
        values["power_source"] = meter.source.name
        if node._last_energy is not None:
            values["energy_per_chunk_j"] = node._last_energy[0]
            values["power_w"] = node._last_energy[1]
        else:
            values["energy_per_chunk_j"] = "n/a (no chunk yet)"
            values["power_w"] = "n/a (no chunk yet)"
    return make_status(name, device, OK, f"power source: {values['power_source']}", values)
