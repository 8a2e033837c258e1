#!/usr/bin/env python
"""Table 9 rows and Figure 3 for some methods at one fraction, from whatever result files a run has.

The workflow's own Table 9 and Figure 3 need every model of the configured grid. After a targeted run (say
``snakemake results/{lm,vision,asr}/eval/{permute,fips}/1of3/best/post.json --configfile ...``) this prints
each task's rows (test before and after fine-tuning, parameters, reduction, local error) and draws Figure 3 from
them with the workflow's own functions.

    python scripts/methods_report.py --methods permute,ffdrop,drop,fips,wide --png docs/results/figure3_methods_1of3.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ffmerge.experiments import fraction_label
from ffmerge.report import figures
from ffmerge.report.tables import results_table, verbatim_positions

COLUMNS = ["variant", "layers", "test_before_ft", "test", "parameters", "param_reduction_%", "repair_error"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--tasks", default="lm,vision,asr")
    parser.add_argument("--fraction", default="1/3")
    parser.add_argument("--methods", default="permute,ffdrop,drop")
    parser.add_argument("--png", type=Path, help="where to draw Figure 3 (and a .pdf beside it)")
    args = parser.parse_args()
    frames = {}
    for task in args.tasks.split(","):
        root = args.results / task / "eval"
        base = json.loads((root / "base" / "post.json").read_text())
        rows = []
        for method in args.methods.split(","):
            folder = root / method / fraction_label(args.fraction) / "best"
            if not (folder / "post.json").is_file():
                print(f"{task}: no {folder / 'post.json'}; left out")
                continue
            pre = json.loads((folder / "pre.json").read_text())
            rows.append(json.loads((folder / "post.json").read_text()) | {"test_before_ft": pre["test"]})
        frames[task] = results_table(base, rows)
        table = frames[task][COLUMNS]
        print(f"\n{task}\n")
        print(table.to_markdown(index=False, floatfmt=".2f", disable_numparse=verbatim_positions(table.columns)))
    if args.png:
        fig, notes = figures.params_removed_figure(frames)
        figures.save_figure(fig, args.png, args.png.with_suffix(".pdf"))
        for note in notes:
            print(note)


if __name__ == "__main__":
    main()
