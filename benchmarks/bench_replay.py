"""Replay benchmark: generate a synthetic ANACOMP cohort, replay it through `protocol-monitor replay`, measure.

    .venv/bin/python benchmarks/bench_replay.py --subjects 1000 --days 60 --seed 1
    .venv/bin/python benchmarks/bench_replay.py --smoke            # 50 subjects x 20 days
    .venv/bin/python benchmarks/bench_replay.py --json .bench/replay.json

The cohort is written to a temporary file (monitor.generate, in this process). The replay runs in a child
process (`sys.executable -m monitor replay FILE`), so the numbers are those of the real command: start-up, rule
loading, parsing, evaluation and alert output. Wall time is measured around the child; peak RSS is the child's
`ru_maxrss` (resource.getrusage(RUSAGE_CHILDREN) after it is waited for; this script starts no other child).
Alert records are the child's stdout lines (raised and retracted both count; the split is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: import the project's own package
    sys.path.insert(0, str(ROOT))

from monitor.generate import generate  # noqa: E402


def _peak_rss_mb() -> float:
    """Largest resident set of any waited-for child: KB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_cohort_file(path: Path, *, subjects: int, days: int, seed: int, sites: int, deviation_rate: float) -> int:
    count = 0
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    with path.open("w", encoding="utf-8") as handle:
        for event in generate(subjects=subjects, days=days, seed=seed, sites=sites, deviation_rate=deviation_rate):
            handle.write(dumps(event))
            handle.write("\n")
            count += 1
    return count


def run_replay(path: Path, *, rules: str | None, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "monitor", "replay", str(path)]
    if rules:
        cmd += ["--rules", rules]
    stderr_path = workdir / "replay.stderr"
    raised = retracted = other = 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with stderr_path.open("wb") as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=env)
        assert child.stdout is not None
        for line in child.stdout:  # consume as it comes, so a large alert stream never blocks the child
            if not line.strip():
                continue
            try:
                status = json.loads(line).get("status")
            except ValueError:
                status = None
            if status == "raised":
                raised += 1
            elif status == "retracted":
                retracted += 1
            else:
                other += 1
        code = child.wait()
        seconds = time.perf_counter() - started
    return {"exit_code": code, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
            "alerts": raised + retracted + other, "alerts_raised": raised, "alerts_retracted": retracted,
            "summary": stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--deviation-rate", type=float, default=0.2)
    parser.add_argument("--rules", default=None, metavar="DIR", help="rules directory (default: the bundled rules/)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: 50 subjects x 20 days")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", default=None, metavar="PATH", help="keep the generated cohort at PATH")
    args = parser.parse_args(argv)
    if args.smoke:
        args.subjects, args.days = 50, 20

    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        workdir = Path(tmp)
        cohort = Path(args.keep).resolve() if args.keep else workdir / "cohort.jsonl"
        started = time.perf_counter()
        events = write_cohort_file(cohort, subjects=args.subjects, days=args.days, seed=args.seed, sites=args.sites,
                                   deviation_rate=args.deviation_rate)
        generate_seconds = time.perf_counter() - started
        run = run_replay(cohort, rules=args.rules, workdir=workdir)

    seconds = run["seconds"]
    result = {
        "events": events, "subjects": args.subjects, "days": args.days, "seed": args.seed, "sites": args.sites,
        "deviation_rate": args.deviation_rate,
        "seconds": round(seconds, 3), "events_per_second": round(events / seconds, 1) if seconds > 0 else None,
        "peak_rss_mb": round(run["peak_rss_mb"], 1), "alerts": run["alerts"],
        "alerts_raised": run["alerts_raised"], "alerts_retracted": run["alerts_retracted"],
        "generate_seconds": round(generate_seconds, 3), "exit_code": run["exit_code"],
        "replay_summary": run["summary"][-3:],
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
    }

    header = ("events", "subjects", "seconds", "events/s", "peak RSS MB", "alerts")
    row = (f"{events:,}", f"{args.subjects:,}", f"{seconds:.2f}",
           f"{result['events_per_second']:,.0f}" if result["events_per_second"] else "-",
           f"{result['peak_rss_mb']:.1f}", f"{run['alerts']:,}")
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    print(" | ".join(v.rjust(w) for v, w in zip(row, widths)))
    print(f"({args.days} days, seed {args.seed}, deviation rate {args.deviation_rate}; alerts raised "
          f"{run['alerts_raised']:,}, retracted {run['alerts_retracted']:,}; cohort generated in "
          f"{generate_seconds:.2f} s; Python {result['python']}, {result['cpus']} CPUs)")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if run["exit_code"] != 0:
        print(f"replay failed with exit code {run['exit_code']}:", file=sys.stderr)
        for line in run["summary"][-20:]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
