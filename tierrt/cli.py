"""The ``tierrt`` command: ``tierrt demo``, ``tierrt info``.

``tierrt-probe`` (bandwidth profiler) is a separate console script (:mod:`tierrt.probe`).
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tierrt", description="tierrt: a memory-tiering runtime for PyTorch"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what tierrt does")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import demo

    demo_parser = sub.add_parser("demo", help="fine-tune a GPT-style model larger than the DRAM budget")
    demo.build_parser(demo_parser)
    sub.add_parser("info", help="which I/O backend, features and devices tierrt uses here")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            return demo.main(args=args)
        if args.command == "info":
            from .sysinfo import format_info

            print(format_info())
            return 0
    except KeyboardInterrupt:
        print("tierrt: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
