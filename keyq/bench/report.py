"""Output of a benchmark run: the result document, a printed table and a PNG plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# (json key, label, unit, target text) in the order the table prints them
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("send_msgs_per_s_one_thread", "producer, one thread: keyq Client.send", "msg/s", ""),
    ("apply_async_msgs_per_s_one_thread", "  plain Celery apply_async", "msg/s", ""),
    ("send_produce_ratio", "  ratio send / apply_async", "x", ">= 4.0"),
    ("send_many_msgs_per_s_one_thread", "  keyq send_many", "msg/s", ""),
    ("send_cpu_us", "  producer CPU per send", "us", ""),
    ("apply_async_cpu_us", "  producer CPU per apply_async", "us", ""),
    ("send_many_cpu_us", "  producer CPU per send_many message", "us", ""),
    ("celery_msgs_per_s", "plain Celery no-op tasks", "msg/s", ""),
    ("keyq_msgs_per_s", "keyq durable keyed messages (send)", "msg/s", ""),
    ("ratio", "  ratio keyq / Celery", "x", ">= 8.0"),
    ("send_many_msgs_per_s", "keyq durable keyed messages (send_many)", "msg/s", ""),
    ("send_many_ratio", "  ratio send_many / Celery", "x", ">= 5.0"),
    ("events_off_msgs_per_s", "keyq send drain, Flower task events off", "msg/s", ""),
    ("events_on_msgs_per_s", "  events on (default rate, sampled above)", "msg/s", ""),
    ("events_ratio", "  ratio events on / off", "x", ""),
    ("events_all_msgs_per_s", "  events for every message (no sampling)", "msg/s", ""),
    ("events_all_ratio", "  ratio every message / off", "x", ""),
    ("worker_us_keyq", "worker CPU per applied message, keyq", "us", ""),
    ("worker_us_celery", "  plain Celery no-op task", "us", ""),
    ("dispatch_rate_target_msgs_per_s", "paced sends at half of peak, asked", "msg/s", ""),
    ("dispatch_rate_msgs_per_s", "  achieved by the senders", "msg/s", ""),
    ("dispatch_flagged", "  flagged: the producers fell behind", "", ""),
    ("dispatch_p50_ms", "  dispatch p50 (send to applied)", "ms", ""),
    ("dispatch_p95_ms", "  dispatch p95", "ms", ""),
    ("dispatch_p99_ms", "  dispatch p99", "ms", ""),
    ("call_p50_ms", "keyq call p50", "ms", ""),
    ("call_p95_ms", "keyq call p95", "ms", "<= 1.2 x Celery"),
    ("call_p99_ms", "keyq call p99", "ms", ""),
    ("celery_call_p50_ms", "Celery apply_async().get() p50", "ms", ""),
    ("celery_call_p95_ms", "Celery apply_async().get() p95", "ms", ""),
    ("celery_call_p99_ms", "Celery apply_async().get() p99", "ms", ""),
    ("call_ratio_p95", "  ratio call p95 keyq / Celery", "x", "<= 1.2"),
    ("pg_commit_p50_ms", "PostgreSQL 1-row commit p50 (fsync floor)", "ms", ""),
    ("pg_commit_p95_ms", "PostgreSQL 1-row commit p95", "ms", ""),
    ("cache_hit_ratio", "cache hit ratio, Zipf(1.1) reads", "", ">= 0.99"),
    ("plain_celery_client_p50_ms", "idle worker, dispatch p50: Client.send", "ms", ""),
    ("plain_celery_client_p95_ms", "  dispatch p95: Client.send", "ms", ""),
    ("plain_celery_celery_p50_ms", "  dispatch p50: plain Celery send_task", "ms", ""),
    ("plain_celery_celery_p95_ms", "  dispatch p95: plain Celery send_task", "ms", ""),
    ("plain_celery_wake_wait_ms", "  idle worker's wake wait (BRPOP, measured)", "ms", ""),
    ("takeover_ms", "takeover after kill -9, 200 msg/s", "ms", "< 1000"),
    ("takeover_idle_ms", "  takeover after kill -9, idle", "ms", "< 1000"),
    ("takeover_load_ms", "  takeover after kill -9, under load", "ms", "< 1000"),
    ("takeover_load_rate_msgs_per_s", "    load offered by one sender (achieved)", "msg/s", ""),
    ("takeover_load_lease_ms", "    every lease moved at (under load)", "ms", ""),
    ("takeover_load_inflight", "    victim's in-flight messages (applied alone)", "msg", ""),
    ("takeover_lease_ttl_ms", "    lease TTL (KEYQ_LEASE_TTL_MS)", "ms", ""),
    ("rss_mb_10k", "worker RSS after 10k keys", "MB", ""),
    ("rss_mb_100k", "worker RSS after 100k keys", "MB", ""),
    ("rss_mb_1m", "worker RSS after 1M keys", "MB", "flat"),
)
# dispatch p95 targets (ms) by asked rate (msg/s), issue 14
DISPATCH_TARGETS_MS = {1000.0: 5.0, 5000.0: 10.0}


def sweep_point(doc: dict[str, Any], asked: float) -> dict[str, Any] | None:
    """The dispatch sweep's point at this asked rate, if the run measured one."""
    for point in doc.get("dispatch_sweep") or []:
        if point.get("asked") == asked:
            return dict(point)
    return None


def targets(doc: dict[str, Any]) -> dict[str, bool | None]:
    """Each target of issues 6 and 14: met, missed, or None when not measured (a dispatch
    point whose producers fell behind is not keyq's figure: None)."""

    def check(value: Any, ok: Any) -> bool | None:
        return None if value is None else bool(ok(value))

    rss = [doc.get("rss_mb_10k"), doc.get("rss_mb_1m")]
    out = {
        "send_produce_ratio >= 4.0": check(doc.get("send_produce_ratio"), lambda v: v >= 4.0),
        "ratio >= 8.0 (drain, write-through)": check(doc.get("ratio"), lambda v: v >= 8.0),
        "send_many_ratio >= 5.0": check(doc.get("send_many_ratio"), lambda v: v >= 5.0),
        "call p95 <= 1.2 x Celery": check(doc.get("call_ratio_p95"), lambda v: v <= 1.2),
        "cache_hit_ratio >= 0.99": check(doc.get("cache_hit_ratio"), lambda v: v >= 0.99),
        "takeover_ms < 1000": check(doc.get("takeover_ms"), lambda v: v < 1000),
        "takeover_idle_ms < 1000": check(doc.get("takeover_idle_ms"), lambda v: v < 1000),
        "takeover_load_ms < 1000": check(doc.get("takeover_load_ms"), lambda v: v < 1000),
        "rss flat 10k -> 1M (< +25%)": None if None in rss else bool(rss[1] <= rss[0] * 1.25),  # type: ignore[operator]
    }
    for asked, limit in DISPATCH_TARGETS_MS.items():
        point = sweep_point(doc, asked)
        fair = point is not None and not point.get("flagged")
        out[f"dispatch p95 < {limit:g} ms at {asked:,.0f} msg/s"] = (
            check(point.get("p95"), lambda v, lim=limit: v < lim) if fair and point else None
        )
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(doc: dict[str, Any]) -> str:
    lines = [f"{'measure':44} {'value':>12} {'unit':6} target"]
    lines.append("-" * 76)
    flat = {
        **doc,
        **{f"worker_us_{k}": v for k, v in (doc.get("worker_us_per_msg") or {}).items()},
        **{f"events_{k}": v for k, v in (doc.get("events_cost") or {}).items()},
        **{f"plain_celery_{k}": v for k, v in (doc.get("plain_celery_dispatch") or {}).items()},
        "takeover_lease_ttl_ms": (doc.get("takeover") or {}).get("lease_ttl_ms"),
        "takeover_load_lease_ms": (doc.get("takeover_load") or {}).get("lease_takeover_ms"),
        "takeover_load_inflight": (doc.get("takeover_load") or {}).get("inflight_at_kill"),
    }
    for key, label, unit, target in ROWS:
        lines.append(f"{label:44} {_fmt(flat.get(key)):>12} {unit:6} {target}")
    sweep = doc.get("dispatch_sweep") or []
    if sweep:
        lines.append("-" * 76)
        lines.append(
            "dispatch latency by paced rate (msg/s asked -> achieved, producers: "
            "p50 / p95 / p99 ms; workers' CPU per message)"
        )
        for point in sweep:
            ms = point["summary_ms"]
            flag = "  FLAGGED: the producers fell behind" if point.get("flagged") else ""
            lines.append(
                f"  {_fmt(point['rate_target']):>8} -> {_fmt(point['rate_achieved']):>8}, "
                f"{point.get('senders')}: {_fmt(ms['p50'])} / {_fmt(ms['p95'])} / "
                f"{_fmt(ms['p99'])} ms; {_fmt(point.get('worker_us_per_msg'))} us{flag}"
            )
    m = doc.get("machine", {})
    v = doc.get("versions", {})
    lines.append("-" * 76)
    lines.append(
        f"machine: {m.get('cores')} cores, {m.get('cpu_model')}, {m.get('memory_gb')} GB; "
        f"workers: {doc.get('config', {}).get('workers')} processes"
    )
    lines.append(
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if isinstance(val, str))
    )
    changed = doc.get("config", {}).get("settings")
    if changed:  # scripts/bench --setting: not keyq's defaults
        lines.append("keyq settings: " + ", ".join(changed))
    met = doc.get("targets", {})
    missed = [k for k, ok in met.items() if ok is False]
    lines.append("targets missed: " + (", ".join(missed) if missed else "none"))
    return "\n".join(lines)


def plot(
    path: str,
    doc: dict[str, Any],
    dispatch_s: Sequence[float],
    keyq_call_s: Sequence[float],
    celery_call_s: Sequence[float],
) -> None:
    """Latency distributions (dispatch, call vs Celery) and throughput bars, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp, ax_rate) = plt.subplots(1, 3, figsize=(17, 4.5))
    for label, data in (
        (f"keyq dispatch at {_fmt(doc.get('dispatch_rate_msgs_per_s'))} msg/s", dispatch_s),
        ("keyq call round trip", keyq_call_s),
        ("Celery apply_async().get()", celery_call_s),
    ):
        if data:
            ms = sorted(x * 1000 for x in data)
            ax_lat.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("latency (ms, log scale)")
    ax_lat.set_ylabel("fraction of messages")
    ax_lat.set_title("Latency distribution (CDF)")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=8)
    names = ["plain Celery\nno-op", "keyq send\n(durable)", "keyq send_many\n(durable)"]
    values = [
        doc.get("celery_msgs_per_s") or 0.0,
        doc.get("keyq_msgs_per_s") or 0.0,
        doc.get("send_many_msgs_per_s") or 0.0,
    ]
    bars = ax_tp.bar(names, values, color=["#888888", "#2a7ab9", "#1b4f72"])
    for bar, value in zip(bars, values, strict=True):
        ax_tp.annotate(
            f"{value:,.0f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    workers = doc.get("config", {}).get("workers")
    ax_tp.set_ylabel("messages per second")
    ax_tp.set_title(f"Throughput, {workers} worker processes, same Redis broker")
    points = sorted(
        [*(doc.get("dispatch_sweep") or []), doc.get("dispatch") or {}],
        key=lambda p: p.get("rate_achieved") or 0.0,
    )
    points = [p for p in points if p.get("rate_achieved")]
    for q in ("p50", "p95", "p99"):
        ax_rate.plot(
            [p["rate_achieved"] for p in points],
            [p["summary_ms"][q] for p in points],
            marker="o",
            label=q,
        )
    for p in points:
        if p.get("flagged"):  # the producers fell behind: not keyq's figure
            ax_rate.annotate(
                "producers\nfell behind",
                (p["rate_achieved"], p["summary_ms"]["p95"]),
                fontsize=7,
                color="#b03030",
            )
    ax_rate.axhline(5.0, color="grey", linestyle="--", linewidth=1, label="5 ms")
    ax_rate.set_xscale("log")
    ax_rate.set_yscale("log")
    ax_rate.set_xlabel("paced send rate (msg/s, log)")
    ax_rate.set_ylabel("send to applied (ms, log)")
    ax_rate.set_title("keyq dispatch latency by load")
    ax_rate.grid(True, which="both", alpha=0.3)
    ax_rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
