"""Kiln's version guard, which runs the unittest driver (driver.py).

The python-unittest plugin starts, from the repository root,

    python3 -c "import sys; exec(sys.stdin.read())" [--slots N] [--timeout S] FILE...

(the loader reads stdin in one go, where `python3 -` would read its program a
byte at a time) and writes to its stdin exactly these bytes:

    b"_KILN_DRIVER = r'''" + DRIVER + b"'''\n" + BOOTSTRAP

where DRIVER is driver.py and BOOTSTRAP is this file, both byte for byte.
The driver is pure ASCII, ends with a newline, and never contains three
single quotes in a row (tests/test_driver.py checks all three), so the raw
string literal holds it unchanged on every Python, and no interpreter ever
parses the driver as code before this guard has run: Python 2.7, 3.6 and
3.7 get the line below instead of a SyntaxError.

On Python older than 3.8 this prints one line on stdout, {"too-old": "X.Y.Z"},
and exits with code 3. Otherwise it runs the driver in this module, the
interpreter's `__main__` (so `__name__ == "__main__"` holds, as it does for
`python3 - < driver.py`, and `sys.path[0]` is the working directory), compiled under the file name "kiln-driver.py",
which tracebacks name; linecache is told its lines so they show the source.

This file must stay valid on Python 2.7 and 3.x, and pure ASCII.
"""

import sys

if sys.version_info < (3, 8):
    sys.stdout.write('{"too-old": "%d.%d.%d"}\n' % tuple(sys.version_info[:3]))
    sys.stdout.flush()
    sys.exit(3)

import linecache

_KILN_SOURCE = globals().pop("_KILN_DRIVER")
linecache.cache["kiln-driver.py"] = (len(_KILN_SOURCE), None, _KILN_SOURCE.splitlines(True), "kiln-driver.py")
exec(compile(_KILN_SOURCE, "kiln-driver.py", "exec"))
