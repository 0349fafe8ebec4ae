"""Kiln's unittest driver: runs the tests of ONE module, one JSON line per test.

The python-unittest plugin passes this file to the interpreter with `-c`,
from the repository root, once per test module:

    python3 -c "$(cat driver.py)" tests.sub.test_x

It loads the module the way `python3 -m unittest discover -s tests -t .`
would (`TestLoader.loadTestsFromModule(module, pattern='test*.py')`, which
honours `load_tests`), runs it, and writes to the ORIGINAL standard output one
JSON object per line:

    {"start": ID}       a test started: if the interpreter dies now, the
                        plugin knows which test killed it
    {"stop": ID}        that test ended
    {"id": ID, "outcome": OUTCOME, "duration_ms": N, "message": TEXT}
                        one result; OUTCOME is pass, fail, error, skip,
                        xfail or xpass
    {"done": true}      the driver finished normally (its absence means the
                        interpreter was cut short, e.g. by os._exit)

Everything the tests themselves print goes to standard error, because file
descriptor 1 is pointed at descriptor 2 before the module is imported: even
output from C code cannot corrupt the JSON stream. Output printed during a
test is also captured (buffer=True) into that test's failure message.

This file runs under any Python 3.8+ and only uses the standard library.
"""

import importlib
import json
import os
import sys
import time
import traceback
import unittest

# When several outcomes are reported for one test (an assertion fails and
# then tearDown raises, say), the worst one is the test's outcome.
_SEVERITY = ["pass", "skip", "xfail", "xpass", "fail", "error"]


def _clean(text):
    """Makes `text` valid UTF-8: lone surrogates (from undecodable bytes)
    would otherwise produce JSON that strict parsers reject."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def _millis(since):
    return max(0, int((time.perf_counter() - since) * 1000))


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


class _Result(unittest.TestResult):
    """Reports each test as it ends.

    A test's own outcomes are collected between startTest and stopTest and
    reported once, at stopTest. Subtests and class or module fixtures
    (unittest's _ErrorHolder, e.g. `setUpClass (tests.test_x.T)`) are
    reported straight away under their own ids.
    """

    def __init__(self, emit, module_name):
        super().__init__()
        self.buffer = True
        self._emit = emit
        self._module_name = module_name
        self._current = None
        self._started = 0.0
        self._outcomes = []
        self._separate_reports = 0

    def _id(self, test):
        test_id = test.id()
        # The loader reports a failing `load_tests` as a test of its own
        # class (`unittest.loader._FailedTest.<module>`); name it after the
        # module instead, so ids say where the problem is.
        prefix = "unittest.loader._FailedTest."
        if test_id.startswith(prefix):
            name = test_id[len(prefix):]
            if name == self._module_name or name.startswith(self._module_name + "."):
                return name
            return self._module_name + "." + name
        return test_id

    def _format(self, err, test):
        try:
            # unittest's own formatting: cleaned traceback plus the output the
            # test printed (buffer=True).
            return self._exc_info_to_string(err, test)
        except Exception:
            # A test may have replaced sys.stdout with something unittest
            # cannot read back; the bare traceback is still worth having.
            return "".join(traceback.format_exception(*err))

    def _record(self, test, outcome, message):
        if test is self._current:
            self._outcomes.append((outcome, message))
            return
        duration = _millis(self._started) if self._current is not None else 0
        if self._current is not None:
            self._separate_reports += 1
        self._emit.result(self._id(test), outcome, duration, message)

    def startTest(self, test):
        super().startTest(test)
        self._current = test
        self._started = time.perf_counter()
        self._outcomes = []
        self._separate_reports = 0
        self._emit(start=_clean(self._id(test)))

    def stopTest(self, test):
        super().stopTest(test)
        test_id = self._id(test)
        if self._outcomes:
            outcome = max((o for o, _ in self._outcomes), key=_SEVERITY.index)
            message = "\n".join(m for _, m in self._outcomes if m)
            self._emit.result(test_id, outcome, _millis(self._started), message)
        elif self._separate_reports == 0:
            # Every test should end with an outcome; say so loudly if not.
            self._emit.result(test_id, "error", _millis(self._started), "unittest reported no outcome for this test")
        self._emit(stop=_clean(test_id))
        self._current = None

    # The add* methods deliberately do not call the base class: it would keep
    # every message in memory and echo captured output to stderr.

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


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: python3 -c DRIVER MODULE\n")
        return 2
    module_name = argv[1]
    emit = _Emitter(_take_stdout())
    started = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
    except unittest.SkipTest as e:
        # As in discover: a module that raises SkipTest on import is skipped.
        emit.result(module_name, "skip", _millis(started), str(e))
    except BaseException:
        # As in discover, anything an import raises (SystemExit included)
        # makes the module one error. The traceback starts below this
        # driver's own frame.
        kind, value, tb = sys.exc_info()
        trace = "".join(traceback.format_exception(kind, value, tb.tb_next if tb else None))
        message = "Failed to import test module: %s\n%s" % (module_name, trace)
        emit.result(module_name, "error", _millis(started), message)
    else:
        suite = unittest.TestLoader().loadTestsFromModule(module, pattern="test*.py")
        result = _Result(emit, module_name)
        result.startTestRun()
        try:
            suite.run(result)
        finally:
            result.stopTestRun()
    emit(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
