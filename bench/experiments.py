"""The multi-seed Task-1 tables of docs/model.md (issue 18): video_id_dropout and the position priors.

    python bench/experiments.py dropout --work /tmp/exp        # 3 data sets x video_id_dropout 0.1 / 0.5 / 0.9
    python bench/experiments.py priors --work /tmp/exp         # 3 data sets x prior none / global / user / exposure
    python bench/experiments.py all --work /tmp/exp --dry-run  # print the commands only

Data (made under --work when missing, by segfast's own commands):
- ``demo``: the demo's data (`segfast synth --format segmm --feature-dim 64 --seed 0`, prepared), both
  modalities, the demo's training options;
- ``kr``: synthetic KuaiRand (`segfast synth --format kuairand --seed 0`, prepared), ID, the sample's options;
- ``sample``: the real SegMM sample (--sample, default ../shared/data/SegMM_inter_sample.csv or
  $SEGFAST_SEGMM_SAMPLE), ID, the options of docs/model.md's unseen-video table.

Every cell is one `segfast experiment --seeds 5` (runs under WORK/E/<name>/seed-<k>, reused when finished, so a
second call only re-evaluates); the tables are printed by bench/experiment_table.py from their experiment.json
files, with paired bootstrap CIs against ItemPosition and UserPosition and against the table's first row (dropout:
the rate 0.1; priors: no prior).
Cost on one CPU thread: about 1 min (kr), 1-2 min (sample), 2.5-4 min (demo) per seed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SAMPLE = Path(os.environ.get("SEGFAST_SEGMM_SAMPLE",
                                     HERE.parents[0] / ".." / "shared" / "data" / "SegMM_inter_sample.csv"))

sys.path.insert(0, str(HERE))
# the demo's training options and the sample's ID options, as the other doc tables use them
from doc_tables import DEMO_TRAIN as DEMO, SAMPLE_TRAIN as ID  # noqa: E402
DATASETS = {"demo": DEMO, "kr": ID, "sample": ID}
# what video_id_dropout="auto" resolves to on each data set (share of training rows on single-row videos:
# demo 0.008, kr 0.135, sample 0.875; segfast.model.config.auto_video_id_dropout): the default model's rate
AUTO_RATE = {"demo": "0.1", "kr": "0.1", "sample": "0.9"}
RATES = ("0.1", "0.5", "0.9")
PRIORS = ("global", "user", "exposure")
EXTRA = {"sample": [("user", ["--set", "pos_init=0"], "user-pos0")]}  # the prior with the position bias at 0


def cells(table: str) -> dict:
    """{data set: [(experiment name, extra train options), ...]} of one table."""
    out = {}
    for ds in DATASETS:
        rows = []
        if table == "dropout":
            rows = [(f"{ds}-vd{r}", ["--set", f"video_id_dropout={r}"]) for r in RATES]
        else:
            r = AUTO_RATE[ds]
            rows = [(f"{ds}-vd{r}", ["--set", f"video_id_dropout={r}"])]
            rows += [(f"{ds}-vd{r}-{p}", ["--set", f"video_id_dropout={r}", "--set", f"prior={p}"]) for p in PRIORS]
            rows += [(f"{ds}-vd{r}-{suffix}", ["--set", f"video_id_dropout={r}", "--set", f"prior={p}"] + more)
                     for p, more, suffix in EXTRA.get(ds, [])]
        out[ds] = rows
    return out


def segfast(*args) -> list:
    return [sys.executable, "-m", "segfast", *map(str, args)]


def run(cmd: list, dry: bool, quiet_stdout: bool = False) -> None:
    print("$ segfast " + " ".join(str(c) for c in cmd[3:]), file=sys.stderr)
    if not dry:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet_stdout else None)


def data(work: Path, ds: str, sample: Path, dry: bool) -> Path:
    out = work / f"{ds}-data"
    if (out / "manifest.json").exists():
        return out
    if ds == "demo":
        run(segfast("synth", "--format", "segmm", "--out", work / "raw-segmm", "--feature-dim", 64, "--seed", 0,
                    "--quiet"), dry)
        run(segfast("prepare", "--source", "segmm", "--input", work / "raw-segmm", "--feature-dim", 64,
                    "--out", out, "--quiet"), dry)
    elif ds == "kr":
        run(segfast("synth", "--format", "kuairand", "--out", work / "raw-kr", "--seed", 0, "--quiet"), dry)
        run(segfast("prepare", "--source", "kuairand", "--input", work / "raw-kr", "--out", out, "--quiet"), dry)
    else:
        if not sample.is_file():
            raise SystemExit(f"{sample}: the SegMM sample CSV is not there (set --sample or SEGFAST_SEGMM_SAMPLE)")
        run(segfast("prepare", "--source", "segmm-sample", "--input", sample, "--out", out, "--quiet"), dry)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=["dropout", "priors", "all"])
    p.add_argument("--work", type=Path, required=True, help="data and experiment directories (reused)")
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="the SegMM sample CSV")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    import experiment_table

    tables = ["dropout", "priors"] if a.table == "all" else [a.table]
    for table in tables:
        for ds, rows in cells(table).items():
            if ds not in a.datasets:
                continue
            d = data(a.work, ds, a.sample, a.dry_run)
            dirs = []
            for name, extra in rows:
                e = a.work / "E" / name
                dirs.append(str(e))
                run(segfast("experiment", "--data", d, "--out", e, "--seeds", a.seeds, *DATASETS[ds], *extra,
                            "--threads", 1, "--quiet"), a.dry_run, quiet_stdout=True)
            if a.dry_run:
                continue
            print(f"\n### {table}: {ds}\n")
            experiment_table.main(dirs + ["--vs-first"]
                                  + ["--regenerate", f"python bench/experiments.py {table} --work {a.work} "
                                                     f"--datasets {ds}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
