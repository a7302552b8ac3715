"""`rlm-train view PATH... -o out.html`: trajectories as one self-contained HTML page.

    rlm-train view runs/gen -o runs/gen/view.html
    rlm-train view runs/eval -o runs/eval/view.html   # one method per run directory

PATH is a trajectory JSONL file, a generate run directory, or a directory of run
directories (an eval's output; its report.json may be passed instead). Bad lines are
skipped and listed in the page.
"""

from __future__ import annotations

import argparse
import sys

from rlm_train.stage import check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="trajectory JSONL file, generate run directory, or eval directory of run directories")
    parser.add_argument("-o", "--out", required=True, metavar="FILE", help="the HTML file to write")
    parser.add_argument("--title", help="page title (default: the paths)")
    parser.add_argument("--max-chars", type=int, default=20_000, metavar="N",
                        help="clip any one text (output, prompt, reply) to N characters in the page; 0 keeps all (default 20000)")


def main(args: argparse.Namespace) -> int:
    from rlm_train.formats import write_text_atomic
    from rlm_train.viewer.load import load
    from rlm_train.viewer.page import render_page

    check_output(args.out, "file", "-o")
    loaded = load(args.paths)
    page = render_page(loaded, title=args.title, max_chars=max(0, args.max_chars))
    write_text_atomic(args.out, page.html)
    methods = len(loaded.sources)
    bad = f", {len(page.problems)} bad line(s) or record(s) skipped (listed in the page)" if page.problems else ""
    print(f"wrote {args.out}: {page.episodes} episode(s) from {methods} "
          f"{'source' if methods == 1 else 'sources'}{bad}", file=sys.stderr)
    return 0
