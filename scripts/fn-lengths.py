#!/usr/bin/env python3
"""Lists the longest Rust functions under the given directories (lines from `fn` to its
closing brace, counted by brace matching; test files and `tests` modules' files skipped).

    scripts/fn-lengths.py crates/cowsnap-core/src crates/cowsnap-nbd/src   # 25 longest
    N=60 scripts/fn-lengths.py crates                                      # more

A reading aid for review (clippy's too_many_lines enforces the hard limit of 100 lines):
the data path aims at functions of about 60 lines or fewer. Braces inside strings and
comments are counted too, so a figure may be off by a line or two.
"""
import os
import re
import sys

FN = re.compile(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?fn\s+(\w+)")


def functions(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            started = started or "{" in lines[j]
            if started and depth <= 0:
                yield j - i + 1, m.group(5), i + 1
                break
            if not started and lines[j].rstrip().endswith(";"):
                break


def main():
    found = []
    for root in sys.argv[1:] or ["crates"]:
        for d, _, files in os.walk(root):
            if {"tests", "target"} & set(d.split(os.sep)):
                continue
            for f in files:
                if f.endswith(".rs") and not f.startswith("tests"):
                    p = os.path.join(d, f)
                    found += [(n, p, name, at) for n, name, at in functions(p)]
    found.sort(reverse=True)
    for n, p, name, at in found[: int(os.environ.get("N", "25"))]:
        print(f"{n:4d} {p}:{at} {name}")


if __name__ == "__main__":
    main()
