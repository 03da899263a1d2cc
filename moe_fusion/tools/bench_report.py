"""Reporting for ``moe-fusion bench``: the stdout table, markdown, JSON, the latency plot, merging runs."""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import Iterable, List, Optional

ROW_KEY = ("shape", "dtype", "part", "m", "variant")
VARIANT_ORDER = ("eager", "inductor", "moe_fusion", "backend")


def load(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    if "rows" not in result or "meta" not in result:
        raise SystemExit(f"moe-fusion bench: {path} is not a bench result (no 'meta'/'rows')")
    return result


def merge(results: List[dict]) -> dict:
    """Rows of several runs, a later run's row replacing an earlier one's with the same key."""
    if len(results) == 1:
        return results[0]
    rows = OrderedDict()
    for result in results:
        for row in result["rows"]:
            rows[tuple(row[k] for k in ROW_KEY)] = row
    meta = dict(results[0]["meta"], merged_from=[r["meta"] for r in results])
    return dict(meta=meta, rows=list(rows.values()))


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def emit(result: dict, json_path=None, markdown_path=None, plot_path=None, summary_ms=None) -> None:
    print(text_table(result))
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown_table(result))
        print(f"wrote {markdown_path}", file=sys.stderr)
    if plot_path:
        plot(result, plot_path)
    if summary_ms:
        print(summary_table(result, summary_ms))


# --------------------------------------------------------------------------- grouping
def _groups(rows: Iterable[dict]) -> "OrderedDict[tuple, OrderedDict[int, dict]]":
    """(shape, dtype, part) -> M (ascending) -> variant -> row; groups in first-seen order."""
    groups: OrderedDict = OrderedDict()
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"], row["part"]), {}).setdefault(row["m"], {})[row["variant"]] = row
    return OrderedDict((key, OrderedDict(sorted(by_m.items()))) for key, by_m in groups.items())


def _variants(rows: Iterable[dict]) -> List[str]:
    present = {r["variant"] for r in rows}
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def _any(by_variant: dict, key: str):
    return next((r[key] for r in by_variant.values() if r.get(key) is not None), None)


def _header(result: dict) -> str:
    meta = result["meta"]
    bw = meta.get("copy_bandwidth_bytes_per_s") or 0.0
    return (f"moe-fusion bench · {meta.get('device', '?')} · torch {meta.get('torch', '?')} · "
            f"triton {meta.get('triton', '?')} · {meta.get('date', '?')} · copy bw "
            f"{bw / 1e12:.2f} TB/s (read+write) · timing: {meta.get('timing', '?')}")


# --------------------------------------------------------------------------- text
def _cell(row: Optional[dict]) -> str:
    if row is None:
        return f"{'':>21}"
    if row.get("us") is None:
        return f"{'(see notes)':>21}"
    kernels = "-" if row.get("kernels") is None else str(row["kernels"])
    frac = "" if row.get("frac_copy_bw") is None else f"{row['frac_copy_bw']:.0%}"
    return f"{row['us']:10.1f} {kernels:>5} {frac:>4}"


def text_table(result: dict) -> str:
    rows = result["rows"]
    variants = _variants(rows)
    lines = [_header(result)]
    for (shape, dtype, part), by_m in _groups(rows).items():
        lines.append("")
        lines.append(f"{shape} · {dtype} · {part}   (µs per call, kernels per call, fraction of copy bandwidth)")
        lines.append(f"{'M':>4} {'experts':>7} {'floor µs':>9} |" + "|".join(f"{v:>21}" for v in variants))
        notes = []
        for m, by_variant in by_m.items():
            experts = _any(by_variant, "distinct_experts")
            floor = _any(by_variant, "floor_us")
            lines.append(
                f"{m:>4} {'' if experts is None else f'{experts:.1f}':>7} "
                f"{'' if floor is None else f'{floor:.1f}':>9} |"
                + "|".join(_cell(by_variant.get(v)) for v in variants))
            notes += [(m, v, r["note"]) for v, r in by_variant.items() if r.get("note")]
        lines += _note_lines(notes)
    return "\n".join(lines)


def _note_lines(notes: List[tuple]) -> List[str]:
    """One line per (variant, note), naming the Ms it applies to."""
    merged: OrderedDict = OrderedDict()
    for m, variant, note in notes:
        merged.setdefault((variant, note), []).append(str(m))
    return [f"  {variant} at M={','.join(ms)}: {note}" for (variant, note), ms in merged.items()]


def summary_table(result: dict, ms: List[int]) -> str:
    rows = result["rows"]
    variants = _variants(rows)
    bw = result["meta"].get("copy_bandwidth_bytes_per_s") or 0.0
    lines = ["", f"summary: µs per call (fraction of the {bw / 1e12:.2f} TB/s copy bandwidth)",
             f"{'shape':<14} {'dtype':<5} {'part':<8} {'M':>3} {'floor':>7} " + " ".join(f"{v:>16}" for v in variants)]
    for (shape, dtype, part), by_m in _groups(rows).items():
        for m in ms:
            by_variant = by_m.get(m)
            if not by_variant:
                continue
            floor = _any(by_variant, "floor_us")
            cells = []
            for v in variants:
                r = by_variant.get(v)
                if r is None or r.get("us") is None:
                    cells.append(f"{'-' if r is None else 'n/a':>16}")
                else:
                    frac = "" if r.get("frac_copy_bw") is None else f" ({r['frac_copy_bw']:.0%})"
                    cells.append(f"{r['us']:.1f}{frac}".rjust(16))
            lines.append(f"{shape:<14} {dtype:<5} {part:<8} {m:>3} {'' if floor is None else f'{floor:.1f}':>7} "
                         + " ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- markdown
def markdown_table(result: dict) -> str:
    rows = result["rows"]
    variants = _variants(rows)
    meta = result["meta"]
    out = [f"# {_header(result)}", "",
           "Cells: µs per call / kernels per call / fraction of the copy bandwidth (touched weight bytes / "
           "time / copy bandwidth). Floor: touched weight bytes / copy bandwidth. Commands: "
           + ", ".join(f"`moe-fusion bench {' '.join(m.get('argv', []))}`" for m in meta.get("merged_from", [meta])), "",
           "| shape | dtype | part | M | experts hit | floor µs | " + " | ".join(variants) + " | notes |",
           "|---|---|---|---:|---:|---:|" + "---:|" * len(variants) + "---|"]
    for (shape, dtype, part), by_m in _groups(rows).items():
        for m, by_variant in by_m.items():
            experts = _any(by_variant, "distinct_experts")
            floor = _any(by_variant, "floor_us")
            cells = []
            for v in variants:
                r = by_variant.get(v)
                if r is None or r.get("us") is None:
                    cells.append("")
                    continue
                kernels = "" if r.get("kernels") is None else f" / {r['kernels']}"
                frac = "" if r.get("frac_copy_bw") is None else f" / {r['frac_copy_bw']:.0%}"
                cells.append(f"{r['us']:.1f}{kernels}{frac}")
            notes = "; ".join(f"{v}: {r['note']}" for v, r in by_variant.items() if r.get("note"))
            out.append(f"| {shape} | {dtype} | {part} | {m} | {'' if experts is None else f'{experts:.1f}'} | "
                       f"{'' if floor is None else f'{floor:.1f}'} | " + " | ".join(cells) + f" | {notes} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plot
def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("moe-fusion bench: --plot needs matplotlib (pip install 'moe-fusion[bench]'); no plot written",
              file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result["rows"])
    variants = _variants(result["rows"])
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((shape, dtype, part), by_m) in zip(axes.flat, groups.items()):
        ms = list(by_m)
        for v in variants:
            points = [(m, by_m[m][v]["us"]) for m in ms if v in by_m[m] and by_m[m][v].get("us") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=v)
        floor = [(m, _any(by_m[m], "floor_us")) for m in ms if _any(by_m[m], "floor_us") is not None]
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="black", label="HBM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_title(f"{shape} · {dtype} · {part}", fontsize=10)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    meta = result["meta"]
    fig.suptitle(f"moe-fusion bench · {meta.get('device', '?')} · torch {meta.get('torch', '?')} · {meta.get('date', '?')}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
