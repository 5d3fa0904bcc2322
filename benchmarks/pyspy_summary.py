"""Where a profiled child spent its time: ``python -m benchmarks.pyspy_summary FILE... [--top N]
[--match TEXT]``.

``--within Worker._loop --within Worker._serve`` keeps only the stacks of the worker's
loop and handler threads (not the imports and set-up before the clock starts).

Reads py-spy's raw output (collapsed stacks, one ``frame;frame;… count`` per line; a run
under ``MEMTREE_BENCH_PYSPY=DIR`` writes one file per memtree child) and prints, per
function, the share of active samples it was on the stack (inclusive) and at the top of
it (self). Idle threads are not sampled, so the shares are of busy time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    parts = Path(path).parts
    for anchor in ("site-packages", "memtree", "benchmarks", "lib"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            path = "/".join(parts[index + (1 if anchor in ("site-packages", "lib") else 0) :])
            break
    return f"{match['func']} ({path})"


def summarize(
    paths: list[Path], within: tuple[str, ...] = ()
) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_name(f) for f in stack.split(";") if f]
            if within and not any(w in frame for frame in frames for w in within):
                continue
            total += count
            for name in set(frames):
                inclusive[name] += count
            if frames:
                own[frames[-1]] += count
    return total, inclusive, own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyspy_summary")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only functions whose name contains this")
    parser.add_argument(
        "--within",
        action="append",
        default=[],
        help="only stacks with a frame containing this (e.g. Worker._loop); repeatable",
    )
    args = parser.parse_args(argv)
    total, inclusive, own = summarize(args.files, tuple(args.within))
    print(f"{total} active samples in {len(args.files)} file(s)")
    print(f"{'incl %':>7} {'self %':>7}  function")
    shown = 0
    for name, count in inclusive.most_common():
        if args.match and args.match not in name:
            continue
        print(f"{100 * count / total:7.1f} {100 * own[name] / total:7.1f}  {name}")
        shown += 1
        if shown >= args.top:
            break
    print("\nself time, top functions:")
    for name, count in own.most_common(args.top // 2):
        print(f"{100 * count / total:7.1f}  {name}")


if __name__ == "__main__":
    main()
