"""Kiln's unittest driver: runs the tests of ONE file exactly as
`python3 -m unittest discover -s tests -t .` would, one JSON line per test.

The python-unittest plugin feeds this file to the interpreter on stdin,
from the repository root, once per file (and again after a crash, see
SKIP_ID below):

    python3 - FILE [SKIP_ID...] < driver.py

FILE is repository-relative: a test module (`tests/sub/test_x.py`) or a
package's `tests/sub/__init__.py`, which stands for what discover loads from
the package itself: the tests defined in `__init__.py`, or, when the package
has a `load_tests`, everything that `load_tests` returns (discover then does
not look inside the package on its own). The driver walks from `tests/` down
to FILE the way discover does: when a package on the way fails to import, is
skipped, or has a `load_tests`, discover never reaches FILE by itself, so the
driver reports nothing for it (that package's own `__init__.py` run reports
the error, the skip, or what its `load_tests` loads). Otherwise it loads FILE
with discover's own code (`TestLoader._find_test_path`, on
`unittest.defaultTestLoader` with discover's state), so module names, import
errors (`_FailedTest`), modules skipped on import (`ModuleSkipped`), the
"module incorrectly imported" check and `load_tests` all behave as they do
under discover.

The process is made to look like `python -m unittest`'s: `sys.argv`,
`sys.path[0]` (the absolute working directory), and the warnings filter
unittest's runner installs while tests run (`default`, unless `-W` options
were given). Tests skipped with SKIP_ID (their `id()`) are left out: the
plugin passes the tests a crashed run had already started, so that the
remaining ones still run in a fresh interpreter.

It writes to the ORIGINAL standard output one JSON object per line:

    {"start": ID}       a test started: if the interpreter dies now, the
                        plugin knows which test killed it
    {"stop": ID}        that test ended
    {"id": ID, "outcome": OUTCOME, "duration_ms": N, "message": TEXT}
                        one result; OUTCOME is pass, fail, error, skip,
                        xfail or xpass
    {"done": true}      the driver finished normally (its absence means the
                        interpreter was cut short, e.g. by os._exit)

IDs are unittest's `test.id()`, except that the loader's placeholders for a
module or package that could not be imported or loaded
(`unittest.loader._FailedTest.tests.test_x`) or was skipped on import
(`unittest.loader.ModuleSkipped.tests.test_x`) are named after the module
(`tests.test_x`). A failing subtest is a result of its own
(`tests.test_x.T.test_m (i=1)`); a failing class or module fixture is
unittest's `_ErrorHolder` (`setUpClass (tests.test_x.T)`).

Output: descriptor 1 is pointed at descriptor 2 before anything is imported,
so nothing a test prints, even from C code or a child process, can corrupt
the JSON stream. While a test (or a class or module fixture) runs, both
descriptors point at a private temporary file instead: what it printed is
added to its message if it fails or errors. This is capture at the file
descriptor level, not unittest's `buffer=True`: tests see the same
`sys.stdout` and `sys.stderr` objects they would see under plain unittest
(real files, with `fileno()`), which buffering would replace. Python's
faulthandler writes to the real standard error, so a crash in C code still
leaves a traceback for the plugin to show.

This file runs under Python 3.8+ and only uses the standard library.
"""

import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
import unittest
import warnings

# discover's pattern, as `-s tests -t .` uses it.
_PATTERN = "test*.py"
_START = "tests"

# When several outcomes are reported for one test (an assertion fails and
# then tearDown raises, say), the worst one is the test's outcome.
_SEVERITY = ["pass", "skip", "xfail", "xpass", "fail", "error"]

# The loader's placeholder classes, whose ids are renamed after the module.
_PLACEHOLDERS = ("unittest.loader._FailedTest.", "unittest.loader.ModuleSkipped.")

# How much of a test's captured output goes into its message: the end,
# where what went wrong usually is.
_OUTPUT_TAIL = 20000


def _clean(text):
    """Makes `text` valid UTF-8: lone surrogates (from undecodable bytes)
    would otherwise produce JSON that strict parsers reject."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def _millis(since):
    return max(0, int((time.perf_counter() - since) * 1000))


def test_id(test):
    """The id Kiln reports for `test`."""
    raw = test.id()
    for prefix in _PLACEHOLDERS:
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


class _Emitter:
    """Writes protocol lines to a private duplicate of the original stdout."""

    def __init__(self, stream):
        self._stream = stream

    def __call__(self, **fields):
        self._stream.write(json.dumps(fields) + "\n")
        self._stream.flush()

    def result(self, test_id, outcome, duration_ms, message):
        self(id=_clean(test_id), outcome=outcome, duration_ms=duration_ms, message=_clean(message))


def _take_stdout():
    """Keeps fd 1 for the protocol and sends everything else to fd 2."""
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(private, "w", encoding="utf-8", newline="\n")


def _flush_all():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            # A test may have closed or replaced a stream; what it held is
            # lost either way.
            pass


class _Capture:
    """Points descriptors 1 and 2 at a private temporary file while a test
    or a fixture runs, and reads back what was written there."""

    def __init__(self):
        # Append mode: after truncating, writes through every duplicate
        # descriptor start again at the beginning.
        self._file = tempfile.TemporaryFile(mode="a+b")
        self._saved = None

    def start(self):
        if self._saved is not None:
            return
        _flush_all()
        self._file.truncate(0)
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)

    def text(self):
        """What was written since `start`, at most its last _OUTPUT_TAIL
        bytes; nothing when no capture is running."""
        if self._saved is None:
            return ""
        _flush_all()
        size = os.fstat(self._file.fileno()).st_size
        start = max(0, size - _OUTPUT_TAIL)
        data = os.pread(self._file.fileno(), size - start, start)
        text = data.decode("utf-8", "replace")
        return ("...\n" + text) if start else text

    def stop(self):
        if self._saved is None:
            return
        _flush_all()
        out, err = self._saved
        self._saved = None
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)


class _Result(unittest.TestResult):
    """Reports each test as it ends.

    A test's own outcomes are collected between startTest and stopTest and
    reported once, at stopTest. Subtests and class or module fixtures
    (unittest's _ErrorHolder, e.g. `setUpClass (tests.test_x.T)`) are
    reported straight away under their own ids.
    """

    def __init__(self, emit, capture):
        super().__init__()
        self._emit = emit
        self._capture = capture
        self._current = None
        self._started = 0.0
        self._outcomes = []
        self._separate_reports = 0

    # unittest calls these around every test (from startTest and stopTest)
    # and around class and module fixtures; with `buffer` they swap
    # sys.stdout and sys.stderr, here they capture the descriptors.

    def _setupStdout(self):
        self._capture.start()

    def _restoreStdout(self):
        self._capture.stop()

    def _format(self, err, test):
        try:
            # unittest's own formatting: the traceback without unittest's
            # frames.
            return self._exc_info_to_string(err, test)
        except Exception:
            return "".join(traceback.format_exception(*err))

    def _with_output(self, message):
        output = self._capture.text()
        if not output.strip():
            return message
        return "%s\nOutput (stdout and stderr):\n%s" % (message.rstrip("\n"), output)

    def _record(self, test, outcome, message):
        if test is self._current:
            self._outcomes.append((outcome, message))
            return
        if outcome in ("fail", "error"):
            message = self._with_output(message)
        duration = _millis(self._started) if self._current is not None else 0
        if self._current is not None:
            self._separate_reports += 1
        self._emit.result(test_id(test), outcome, duration, message)

    def startTest(self, test):
        self._current = test
        self._started = time.perf_counter()
        self._outcomes = []
        self._separate_reports = 0
        self._emit(start=_clean(test_id(test)))
        super().startTest(test)

    def stopTest(self, test):
        tid = test_id(test)
        if self._outcomes:
            outcome = max((o for o, _ in self._outcomes), key=_SEVERITY.index)
            message = "\n".join(m for _, m in self._outcomes if m)
            if outcome in ("fail", "error"):
                message = self._with_output(message)
            self._emit.result(tid, outcome, _millis(self._started), message)
        elif self._separate_reports == 0:
            # Every test should end with an outcome; say so loudly if not.
            self._emit.result(tid, "error", _millis(self._started), "unittest reported no outcome for this test")
        super().stopTest(test)
        self._emit(stop=_clean(tid))
        self._current = None

    # The add* methods deliberately do not call the base class: it would keep
    # every message in memory.

    def addSuccess(self, test):
        self._record(test, "pass", "")

    def addFailure(self, test, err):
        self._record(test, "fail", self._format(err, test))

    def addError(self, test, err):
        self._record(test, "error", self._format(err, test))

    def addSkip(self, test, reason):
        self._record(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        self._record(test, "xfail", self._format(err, test))

    def addUnexpectedSuccess(self, test):
        self._record(test, "xpass", "unexpected success: the test is marked as an expected failure but passed")

    def addSubTest(self, test, subtest, err):
        # A passing subtest is not reported: its test reports `pass` once all
        # of its subtests pass.
        if err is None:
            return
        outcome = "fail" if issubclass(err[0], test.failureException) else "error"
        self._record(subtest, outcome, self._format(err, test))


def _imitate_unittest_main():
    """Makes this process look like `python -m unittest discover -s tests -t .`."""
    sys.argv = [os.path.basename(sys.executable) + " -m unittest", "discover", "-s", _START, "-t", "."]
    # `-m` puts the absolute working directory first on sys.path; `-c` an
    # empty string. discover then finds the top-level directory there and
    # adds nothing.
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.getcwd()


def _prepare_loader():
    """unittest.defaultTestLoader (the one `unittest.main` uses, and that
    load_tests functions may reach for) in the state discover leaves it in."""
    loader = unittest.defaultTestLoader
    top = os.path.abspath(".")
    if top not in sys.path:
        sys.path.insert(0, top)
    loader._top_level_dir = top
    return loader


def _reached(loader, target):
    """Whether discover, walking from tests/, reaches `target` (a module file
    or a package directory) by itself. It does not when a package on the way
    has no __init__.py, fails to import (or is skipped on import), or has a
    load_tests, which then loads that package's tests or leaves them out."""
    start = os.path.join(loader._top_level_dir, _START)
    parent = os.path.dirname(target)
    relative = os.path.relpath(parent, start)
    if relative.startswith(os.pardir) or os.path.isabs(relative):
        return os.path.normpath(target) == os.path.normpath(start)
    directories = [start]
    if relative != os.curdir:
        for part in relative.split(os.sep):
            directories.append(os.path.join(directories[-1], part))
    for directory in directories:
        if not os.path.isfile(os.path.join(directory, "__init__.py")):
            return False
        name = loader._get_name_from_path(directory)
        try:
            package = loader._get_module_from_name(name)
        except BaseException:
            # As discover: anything a package's import raises stops it there.
            return False
        if getattr(package, "load_tests", None) is not None:
            return False
        if directory != start:
            # discover marks the packages it is walking through.
            loader._loading_packages.add(name)
    return True


def _without(test, skip):
    """`test` without the tests whose ids are in `skip`."""
    if isinstance(test, unittest.BaseTestSuite):
        kept = []
        for child in test._tests:
            child = _without(child, skip)
            if child is not None:
                kept.append(child)
        test._tests = kept
        return test
    try:
        ids = {test.id(), test_id(test)}
    except Exception:
        return test
    return None if ids & skip else test


def _run(suite, emit):
    capture = _Capture()
    result = _Result(emit, capture)
    # What unittest's TextTestRunner does around a run, with the `warnings`
    # argument unittest.main gives it.
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("default")
            warnings.filterwarnings("module", category=DeprecationWarning, message=r"Please use assert\w+ instead.")
        result.startTestRun()
        try:
            suite(result)
        finally:
            result.stopTestRun()
            capture.stop()


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: python3 - FILE [SKIP_ID...] < driver.py\n")
        return 2
    path, skip = argv[1], set(argv[2:])
    emit = _Emitter(_take_stdout())
    # A crash in C code then leaves a traceback on the real stderr, even
    # while a test's output is being captured.
    stderr = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=stderr)
    _imitate_unittest_main()
    loader = _prepare_loader()
    full = os.path.abspath(path)
    target = os.path.dirname(full) if os.path.basename(full) == "__init__.py" else full
    started = time.perf_counter()
    if _reached(loader, target):
        try:
            tests, _ = loader._find_test_path(target, _PATTERN)
        except Exception:
            # discover lets this escape (the "module incorrectly imported"
            # check), ending the whole run; here it ends this file only.
            name = loader._get_name_from_path(target)
            message = "discover could not load this file:\n" + traceback.format_exc()
            emit.result(name, "error", _millis(started), message)
        else:
            if tests is not None:
                _run(_without(tests, skip), emit)
    emit(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
