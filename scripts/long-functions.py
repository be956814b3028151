#!/usr/bin/env python3
"""Lists functions longer than a limit (default 100 lines) in C++ sources: a function
is a definition whose body opens at the end of a line and closes with a '}' at the
same indentation. Used as a check: scripts/long-functions.py engine cuda exits 1 when
any host function is longer. Kernel bodies (*.cu, *_body.h) are device code: skipped."""
import os
import re
import sys

LIMIT = 100
START = re.compile(r'^(\s*)[A-Za-z_][\w:<>,\s\*&~\[\]]*\([^;]*\)\s*(const)?\s*(override)?\s*(->\s*[\w:<>]+)?\s*\{\s*$')


def scan(path):
    lines = open(path, encoding='utf-8', errors='replace').read().split('\n')
    out = []
    i = 0
    while i < len(lines):
        m = START.match(lines[i])
        if m and not re.match(r'^\s*(if|for|while|switch|else|do|namespace|struct|class)\b', lines[i]):
            indent = m.group(1)
            # A constructor's body after its initializer list closes at the definition's
            # indent (column 0 in this code base).
            if indent and i > 0 and lines[i - 1].rstrip().endswith(','):
                indent = ''
            j = i + 1
            while j < len(lines) and lines[j] != indent + '}':
                j += 1
            n = j - i + 1
            if n > LIMIT:
                out.append((n, i + 1, lines[i].strip()))
            i = j + 1 if j < len(lines) else i + 1
        else:
            i += 1
    return out


def main(dirs):
    bad = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in sorted(files):
                if not f.endswith(('.cc', '.h')) or f.endswith('_body.h'):
                    continue
                p = os.path.join(root, f)
                for n, line, text in scan(p):
                    print(f'{p}:{line}: {n} lines: {text[:80]}')
                    bad += 1
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:] or ['engine', 'cuda']))
