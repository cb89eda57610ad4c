"""CLI entry: ``python -m aiokvpipe.bench SUITE [options]``.

Each suite lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> list[Result]``; they are imported only when chosen.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .report import Result, print_table, write_json

SUITES = ("pipe", "ring", "cuda", "kv", "blocks", "endpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiokvpipe.bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    wanted = next(
        (a for a in (argv if argv is not None else sys.argv[1:]) if a in (*SUITES, "all")), None
    )
    for name in (*SUITES, "all"):
        p = sub.add_parser(name, help=f"run the {name} benchmarks")
        p.add_argument("--json", metavar="PATH", help="also write results as JSON (- for stdout)")
        p.add_argument("--plot", metavar="PNG", help="draw the figures (needs matplotlib)")
        p.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
        p.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
        if name == wanted and name != "all":  # import only the suite asked for
            import_module(f"aiokvpipe.bench.{name}").add_arguments(p)
    args = parser.parse_args(argv)
    if args.plot:
        from .plot import check_available

        check_available()  # fail now, not after a long run
    chosen = SUITES if args.suite == "all" else (args.suite,)
    results: list[Result] = []
    for name in chosen:
        module = import_module(f"aiokvpipe.bench.{name}")
        if args.suite == "all":
            defaults = argparse.ArgumentParser()
            module.add_arguments(defaults)
            for key, value in vars(defaults.parse_args([])).items():
                setattr(args, key, getattr(args, key, value))
        results.extend(module.run(args))
    print_table(results)
    if args.json:
        write_json(results, args.json)
    if args.plot:
        from .plot import plot_results

        plot_results(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
