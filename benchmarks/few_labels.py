"""Few labels: does the DiffuMask stream help when real labels are scarce?

For each real training-set size (ToyWorld train images drawn with the run's seed) and each seed,
DeepLabV3 is trained twice with the same optimizer steps, batch size, crop and ToyWorld val split:

- ``real_only``: the real images alone;
- ``mixed``: the same real images + a DiffuMask synthetic set through ``ConcatDataset``, the real
  part repeated so that ``--synthetic-ratio`` of the samples are synthetic (train_deeplab.py's
  ``--real-images``, ``--synthetic-length``, ``--synthetic-ratio``), once per generator model.

The table gives mean ± sample standard deviation over seeds and the gain of mixing in mIoU points.

    python benchmarks/few_labels.py --json benchmarks/results/few_labels.json --results-md benchmarks/RESULTS.md

Runs finished earlier into the same JSON are kept (an interrupted table resumes where it stopped);
``--results-md`` rewrites the part of that Markdown file between the few-labels markers
(``<!-- few_labels:begin -->`` ... ``<!-- few_labels:end -->``; ``--results-section NAME`` uses
``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``, so several tables can live in one file).
``--baseline JSON`` takes the real-only runs from another few_labels.py JSON, so several mixed
variants (other trainer flags after ``--``) are compared with one set of real-only runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import baseline_runs, paired_gain, resumable_runs, train, write_json


def markers(section: str) -> tuple[str, str]:
    """The HTML comments a results section sits between."""
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="real-only vs real + DiffuMask stream with 25, 100, 1000 real ToyWorld images")
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 1000], help="real training images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=["toy", "toy-unaided"], help="generator models for the mixed runs")
    p.add_argument("--real-only", action="store_true",
                   help="train only the real-only runs (what the real images reach alone), no mixed run")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--synthetic-ratio", type=float, nargs="+", default=[0.5],
                   help="share of synthetic samples in a mixed run (several: one mixed run per ratio)")
    p.add_argument("--synthetic-length", type=int, default=512, help="synthetic images generated per mixed run")
    p.add_argument("--work-dir", type=Path, default=Path("out/few_labels"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None,
                   help="Markdown file whose part between <!-- SECTION:begin --> and <!-- SECTION:end --> gets the table")
    p.add_argument("--results-section", default="few_labels", metavar="SECTION",
                   help="name in the markers of --results-md (default: few_labels)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="take the real-only runs from this few_labels.py JSON (e.g. made with --real-only and other "
                        "trainer flags) instead of training them")
    p.add_argument("--table-only", action="store_true",
                   help="build the table from the runs already in --json, training nothing (missing runs: 'not run')")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more train_deeplab.py flags, after --")
    return p


def run_key(condition: str, size: int, seed: int) -> str:
    return f"{condition}/{size}/seed{seed}"


def planned_runs(args) -> list[tuple[str, list[str]]]:
    """(key, train_deeplab.py flags) of every run, real-only first (they need no generator; none when
    ``--baseline`` gives them)."""
    runs = []
    for size in args.sizes if args.baseline is None else []:
        for seed in args.seeds:
            runs.append((run_key("real_only", size, seed), ["--real-only", "--real-images", str(size), "--seed", str(seed)]))
    for stream in streams(args):
        model, ratio, length = parse_stream(stream)
        for size in args.sizes:
            for seed in args.seeds:
                runs.append((run_key(f"mixed:{stream}", size, seed),
                             ["--model", model, "--real-images", str(size), "--seed", str(seed),
                              "--synthetic-ratio", ratio, "--synthetic-length", length]))
    return runs


def streams(args) -> list[str]:
    """``model@RATIOxLENGTH`` of every mixed condition (synthetic share and images), the name its
    runs are keyed under."""
    if args.real_only:
        return []
    return [f"{model}@{ratio:g}x{args.synthetic_length}" for model in args.models for ratio in args.synthetic_ratio]


def parse_stream(stream: str) -> tuple[str, str, str]:
    """``"toy@0.5x256"`` → ``("toy", "0.5", "256")``."""
    model, rest = stream.rsplit("@", 1)
    ratio, length = rest.split("x")
    return model, ratio, length


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_mious(results: dict, condition: str, size: int) -> dict[int, float]:
    """``{seed: mIoU}`` of one condition's runs at one size."""
    prefix = f"{condition}/{size}/seed"
    return {int(k[len(prefix):]): r["miou"] for k, r in results.items() if k.startswith(prefix)}


def runs_of_seeds(runs: dict, seeds: list[int]) -> dict:
    """The runs of ``seeds`` only: a table of seeds 6-11 leaves out the same JSON's runs of seeds
    0-5, on both sides of the comparison."""
    wanted = {str(seed) for seed in seeds}
    return {k: r for k, r in runs.items() if k.rsplit("/seed", 1)[1] in wanted}


def summarize(results: dict, sizes: list[int], mixes: list[str], baseline: dict | None = None) -> tuple[dict, str]:
    """Per size: each condition's mean/std mIoU over the seeds it has, and each mixed condition's
    (``mixes``: "model@RATIOxLENGTH") gain in points (mean of mixed minus mean of real-only); and the
    Markdown table of it; per mixed condition also the paired comparison over the seeds both have
    (``paired:MIX``: gain per seed, seeds ahead, paired t-test p). Real-only runs come from
    ``results``, else from ``baseline`` (another JSON's runs)."""
    if baseline is not None and not any(k.startswith("real_only/") for k in results):
        results = {**{k: r for k, r in baseline.items() if k.startswith("real_only/")}, **results}
    summary, lines = {}, []
    header = "| real images | real-only mIoU |" + "".join(" real + {} stream, ratio {}, {} images | gain |".format(*parse_stream(m)) for m in mixes)
    lines += [header, "|" + "---|" * (2 + 2 * len(mixes))]
    for size in sizes:
        row = {}
        for condition in ["real_only", *(f"mixed:{m}" for m in mixes)]:
            values = list(seed_mious(results, condition, size).values())
            if values:
                mean, std = mean_std(values)
                row[condition] = {"mean": mean, "std": std, "seeds": len(values)}
        for m in mixes:
            if "real_only" in row and f"mixed:{m}" in row:
                row[f"gain_points:{m}"] = 100 * (row[f"mixed:{m}"]["mean"] - row["real_only"]["mean"])
                row[f"paired:{m}"] = paired_gain(seed_mious(results, f"mixed:{m}", size), seed_mious(results, "real_only", size))
        summary[str(size)] = row

        def cell(condition):
            c = row.get(condition)
            return f"{c['mean']:.3f} ± {c['std']:.3f} ({c['seeds']})" if c else "not run"

        def gain(m):
            if f"gain_points:{m}" not in row:
                return "–"
            text, paired = f"{row[f'gain_points:{m}']:+.1f}", row[f"paired:{m}"]
            if paired:
                p = f", p {paired['p_paired']:.2g}" if "p_paired" in paired else ""
                text += f" ({paired['ahead']} of {len(paired['seeds'])} seeds ahead{p})"
            return text

        gains = "".join(f" {cell(f'mixed:{m}')} | {gain(m)} |" for m in mixes)
        lines.append(f"| {size} | {cell('real_only')} |{gains}")
    return summary, "\n".join(lines)


def check_results_file(path: Path, section: str) -> str:
    """``path``'s text; refused (before hours of training) when it lacks the section's markers."""
    if not path.is_file():
        raise SystemExit(f"error: --results-md {path} is not a file")
    text = path.read_text()
    begin, end = markers(section)
    if begin not in text or end not in text:
        raise SystemExit(f"error: {path} has no {begin} ... {end} markers to put the table between")
    return text


def write_results_section(path: Path, section: str, table: str, command: str) -> None:
    """Replace the text between the section's markers in ``path`` with the table."""
    text = check_results_file(path, section)
    begin, end = markers(section)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = f"{begin}\n`{command}`\n\n{table}\n\nmIoU: mean ± sample standard deviation (number of seeds); gain in mIoU points.\n{end}"
    path.write_text(head + body + tail)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    if args.real_only and args.baseline is not None:
        raise SystemExit("error: --real-only trains the real-only runs that --baseline would take from another JSON; "
                         "give one of them")
    if args.results_md is not None:
        check_results_file(args.results_md, args.results_section)
    # The synthetic share and length are in each mixed run's key; these settings hold for every run.
    config = {"steps": args.steps, "extra": extra}
    results = resumable_runs(args.json, config)
    baseline = baseline_runs(args.baseline)
    if baseline is not None:
        # The same seeds on both sides: a baseline run with more seeds would compare other draws.
        baseline = runs_of_seeds(baseline, args.seeds)
    for key, flags in planned_runs(args):
        if key in results or args.table_only:
            continue
        flags = [*flags, "--steps", str(args.steps), "--output-dir", str(args.work_dir / key.replace(":", "_")),
                 "--data-dir", str(args.work_dir / "toyworld"), *extra]
        print(f"== {key}: train_deeplab.py {' '.join(flags)}", flush=True)
        started = time.perf_counter()
        final = train(flags)
        results[key] = {"miou": final["miou"], "per_class_iou": final["per_class_iou"],
                        "minutes": (time.perf_counter() - started) / 60, "flags": flags}
        summary, _ = summarize(runs_of_seeds(results, args.seeds), args.sizes, streams(args), baseline)
        write_json(args.json, {"config": config, "runs": results, "summary": summary})  # after every run
    summary, table = summarize(runs_of_seeds(results, args.seeds), args.sizes, streams(args), baseline)
    write_json(args.json, {"config": config, "runs": results, "summary": summary})
    print(table)
    if args.results_md is not None:
        # The command that trains the table (--table-only only re-reads it).
        command = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table-only"]
        write_results_section(args.results_md, args.results_section, table, "python benchmarks/few_labels.py " + " ".join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
