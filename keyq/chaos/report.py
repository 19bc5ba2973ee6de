"""The chaos run's readable summary (the JSON document is the full record)."""

from __future__ import annotations

from typing import Any


def summary(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        f"keyq chaos  seed={doc['seed']}  mode={doc['mode']}  "
        f"messages={doc['config']['messages']}  keys={doc['config']['keys']}  "
        f"workers={doc['config']['workers']}  partitions={doc['config']['partitions']}",
        "",
        "faults applied (seconds after the load started):",
    ]
    for f in doc["faults"]:
        detail = ", ".join(
            f"{k}={v}" for k, v in f.items() if k not in ("kind", "at_s", "planned_at_s", "wall")
        )
        lines.append(f"  {f['at_s']:7.2f}s  {f['kind']:<14} {detail}")
    if not doc["faults"]:
        lines.append("  (none)")
    lines += [
        "",
        f"  accepted               {s['accepted']:>8}",
        f"  applied                {s['applied']:>8}",
        f"  lost                   {s['lost']:>8}",
        f"  doubled                {s['doubled']:>8}",
        f"  out_of_order           {s['out_of_order']:>8}",
        f"  unknown items          {s['unknown']:>8}",
        f"  send errors (uncertain){s['uncertain']:>8}   of which applied: "
        f"{s['applied_uncertain']}",
        f"  dead_lettered          {s['dead_lettered']:>8}   journal: "
        f"{doc['dead_letters']['journal']}, other: {doc['dead_letters']['other']}",
        f"  poison_sent            {s['poison_sent']:>8}",
        f"  poison_accounted       {s['poison_accounted']:>8}   left on the broker: "
        f"{doc['poison']['left_on_broker']}, on partitions that lost or reordered: "
        f"{doc['poison']['on_partitions_with_problems']}",
        f"  worker_deaths_unplanned{s['worker_deaths_unplanned']:>8}   workers started: "
        f"{doc['workers']['started']}",
        f"  drain                  {'STALLED' if s['stall'] else 'ok':>8}   "
        f"{doc['drain']['seconds']} s, left: {doc['drain']['left']}",
        "",
        f"load {doc['timing']['load_s']} s, drain {doc['drain']['seconds']} s, "
        f"total {doc['timing']['total_s']} s",
        "RESULT: " + ("PASS" if doc["ok"] else "FAIL (" + ", ".join(doc["failures"]) + ")"),
    ]
    return "\n".join(lines)
