"""Start-up time of the quick CLI commands: ``cgwgan sql "select 1"`` and ``cgwgan tables``.

    python benchmarks/bench_cli_start.py [--repeats 5] [--home DIR] [--baseline PATH_TO_OLD_CLI.py]

Each command runs ``repeats`` times as a fresh process (the console script's Python, so every
import is paid), on an empty home unless ``--home`` names one; wall time per run, median and
min reported. The modules each command imports are listed by ``-X importtime`` (heavy ones:
dagster, torch, pymatgen, matgl, ray). ``--baseline``: a copy of an older ``orchestration/cli.py``
run the same way (``git show <rev>:orchestration/cli.py > old_cli.py``), for a before/after.

Writes ``benchmarks/results/bench_cli_start.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("dagster", "torch", "pymatgen", "matgl", "ray", "phonopy", "ase", "matplotlib")
COMMANDS = {"sql select 1": ["sql", "select 1"], "tables": ["tables"]}


def _run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _heavy_imports(argv: list[str], env: dict[str, str]) -> list[str]:
    res = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], cwd=ROOT, env=env, check=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in res.stderr.splitlines() if "|" in ln}
    return sorted(n for n in names if n in HEAVY)


def bench(entry: list[str], home: str, repeats: int) -> dict[str, dict]:
    env = {**os.environ, "CGWGAN_HOME": home, "PYTHONPATH": str(ROOT)}
    out = {}
    for name, args in COMMANDS.items():
        argv = [*entry, *args]
        _run(argv, env)  # warm the file cache once
        times = [_run(argv, env) for _ in range(repeats)]
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times,
                     "heavy_imports": _heavy_imports(argv, env)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--home", help="a CGWGAN_HOME with tables (default: an empty one)")
    ap.add_argument("--baseline", type=Path, help="an older orchestration/cli.py to compare with")
    args = ap.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="cgwgan-bench-home-")
    script = Path(sys.executable).parent / "cgwgan"  # the console script users run
    entry = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "orchestration.cli"]
    results = {"now": bench(entry, home, args.repeats)}
    if args.baseline:
        results["baseline"] = bench([sys.executable, str(args.baseline.resolve())], home, args.repeats)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "repeats": args.repeats,
            "home": "empty" if not args.home else args.home, "load_avg": os.getloadavg()}
    res_dir = ROOT / "benchmarks" / "results"
    (res_dir / "bench_cli_start.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# CLI start-up time", "", f"Python {meta['python']}, {meta['cpus']} CPUs, load average "
             f"{', '.join(f'{x:.2f}' for x in meta['load_avg'])}; {args.repeats} fresh processes per command "
             f"(after one warm-up), home: {meta['home']}.", "",
             "| version | command | median (s) | min (s) | heavy modules imported |", "|---|---|---|---|---|"]
    for version, res in results.items():
        for cmd, r in res.items():
            lines.append(f"| {version} | `cgwgan {cmd}` | {r['median_s']:.2f} | {r['min_s']:.2f} | "
                         f"{', '.join(r['heavy_imports']) or 'none'} |")
    (res_dir / "bench_cli_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
