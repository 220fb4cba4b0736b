"""Seconds of a pipeline directory's report (``hpcdyn.distributed.pipeline.report_stage``) on a fresh
local Ray, and of each figure; the report is rewritten in place.

    python benchmarks/report_time.py runs/pipeline

Compare two versions back to back on the same directory (these machines are noisy), e.g. the commit
before with ``git worktree add ../before HEAD~1`` and ``PYTHONPATH=../before python benchmarks/report_time.py DIR``.
"""

import argparse
import json
import time
from pathlib import Path

import analysis.report as report
from hpcdyn.distributed.pipeline import PipelineOptions, report_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a finished pipeline directory (hpcdyn pipeline --out)")
    args = parser.parse_args()
    record = json.loads((args.directory / "pipeline.json").read_text())
    figures = []
    save = report.save_figure

    def timed_save(figure, stem):
        begin = time.perf_counter()
        paths = save(figure, stem)
        figures.append((Path(stem).name, time.perf_counter() - begin))
        return paths

    report.save_figure = timed_save
    stages = record["stages"]
    activity = [entry["store"] for entry in stages.get("activity", {}).get("stores", {}).values()]
    begin = time.perf_counter()
    report_stage(args.directory, stages, activity, PipelineOptions())
    print(f"report: {time.perf_counter() - begin:.1f} s (a fresh local Ray's start included)")
    for name, seconds in figures:
        print(f"  figure {name}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
