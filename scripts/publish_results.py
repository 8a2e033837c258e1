#!/usr/bin/env python
"""Copy a finished run's figures and tables into docs/results/ (the copies the README shows), with the
per-stage compute of every task from Snakemake's benchmark files and the run's disk footprint.

    python scripts/publish_results.py                 # after `snakemake --cores 2` of the default config
    python scripts/publish_results.py --results other_results --out docs/results
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ffmerge.report.tables import disk_footprint, footprint_text, stage_times

FIGURES = ("figure2_ff_removed", "figure3_params_removed", "figure10_window_scores", "recovery_curves")
TABLES = ("table9_results", "table2_windows", "table3_anchors", "table4_int8", "paper_comparison")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    report = args.results / "report"
    missing = [n for n in FIGURES if not (report / f"{n}.png").is_file()]
    missing += [n for n in TABLES if not (report / f"{n}.md").is_file()]
    if missing:
        raise SystemExit(f"{report} lacks {missing}: run `snakemake --cores 2` to the end first")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(report / f"{name}.png", args.out / f"{name}.png")
    for name in TABLES:
        shutil.copyfile(report / f"{name}.md", args.out / f"{name}.md")
    for png in sorted(args.results.glob("*/figures/cka_*.png")):
        shutil.copyfile(png, args.out / f"{png.parent.parent.name}_{png.name}")
    times = stage_times(args.results / "benchmarks", args.results / "logs")
    totals = times.groupby("task", sort=False)[["jobs", "wall_s", "cpu_s"]].sum().reset_index()
    text = "Per task and rule: jobs, summed job wall time and CPU time (s), largest peak RSS (MB).\n\n"
    text += times.round(1).to_markdown(index=False) + "\n\nPer task:\n\n" + totals.round(1).to_markdown(index=False)
    tasks = sorted(p.name for p in args.results.iterdir() if (p / "eval").is_dir())
    footprint = footprint_text(disk_footprint(args.results, tasks))
    text += "\n\nDisk footprint of the run (GB = 10^9 bytes):\n\n```\n" + footprint
    (args.out / "stage_times.md").write_text(text + "\n```\n")
    print(f"wrote {args.out}: {len(FIGURES)} figures, {len(TABLES)} tables, CKA heatmaps, stage_times.md")


if __name__ == "__main__":
    main()
