"""Kiln's unittest driver: runs the tests of a batch of files, each exactly as
`python3 -m unittest discover -s tests -t .` would, one JSON line per test.

The python-unittest plugin starts it from the repository root, fed on stdin
behind the version guard to a one-line loader (bootstrap.py says which
command and which bytes, exactly); by hand, `python3 - ARGS < driver.py`:

    python3 -c LOADER [--slots N] [--timeout SECONDS] [--more] [--] FILE...

Design: a warm forking batch. This process, the PARENT, imports what the
driver needs once (unittest and a few standard modules, never a test module
or a package under tests/), makes itself look like `python -m unittest`, and
then forks one CHILD per FILE (os.fork, no exec: the child starts warm, as a
copy-on-write copy of the parent), at most N at once (`--slots`, default 1).
Each child runs that one file and exits; the parent never imports a test
module, so every file sees a fresh import of its modules, as it did with one
interpreter per file. A child that dies (a crash in C code, os._exit, a
signal, running out of time) costs only the test that was running: the
parent reports that test as an error and forks a fresh child for the same
file, leaving out every test that had started.

FILE is repository-relative: a test module (`tests/sub/test_x.py`) or a
package's `tests/sub/__init__.py`, which stands for what discover loads from
the package itself: the tests defined in `__init__.py`, or, when the package
has a `load_tests`, everything that `load_tests` returns (discover then does
not look inside the package on its own). The child walks from `tests/` down
to FILE the way discover does: when a package on the way fails to import, is
skipped, or has a `load_tests`, discover never reaches FILE by itself, so
the driver reports nothing for it (that package's own `__init__.py` reports
the error, the skip, or what its `load_tests` loads). Otherwise it loads FILE
with discover's own code (`TestLoader._find_test_path`, on
`unittest.defaultTestLoader` with discover's state), so module names, import
errors (`_FailedTest`), modules skipped on import (`ModuleSkipped`), the
"module incorrectly imported" check and `load_tests` all behave as they do
under discover. A FILE given twice runs once.

The process is made to look like `python -m unittest`'s: `sys.argv`,
`sys.path[0]` (the absolute working directory), and the warnings filter
unittest's runner installs while tests run (`default`, unless `-W` options
were given). One addition: a `src/` layout gets its `src` directory on
sys.path right after the working directory, as `PYTHONPATH=src` would put
it (see `_src_layout` for when a repository counts as one).

Protocol. The parent writes to its ORIGINAL standard output one JSON object
per line, each flushed as the event happens, so results stream:

    {"driver": 2, "python": "3.11.7"}
                    the first line: this protocol, and the interpreter
    {"file": F, "id": ID, "outcome": O, "duration_ms": N, "message": TEXT}
                    one result; O is pass, fail, error, skip, xfail or xpass
    {"file-done": F}
                    every result of F has been written (exactly once per F,
                    also when F yields no result)
    {"idle": true}  with --more: every file given so far is done (written
                    once each time the driver runs out of files)
    {"done": true}  the last line: the driver finished normally (its absence
                    means the parent itself was cut short)

With `--more`, the driver runs more files after its FILE arguments: each
line it reads on stdin after the program is a JSON list of FILE paths,
queued as if they had been given as arguments (a path given before runs
once). It ends once stdin is closed and every file is done. This is how one
warm interpreter serves several batches of a commit: the plugin hands it the
next batch's files when it says `idle`, instead of starting another.

F is the FILE argument exactly as given. Within a file an id is reported at
most once (a later report of the same id, e.g. a class fixture failing again
in a restarted child, is dropped). The exit code is 0 after `done`, 2 for a
usage error, and 3 (with a `too-old` line instead) from the version guard.
The parent ends with os._exit right after its last line: no interpreter
finalization (and no atexit handler) runs after `done`.

IDs are unittest's `test.id()`, except that the loader's placeholders for a
module or package that could not be imported or loaded
(`unittest.loader._FailedTest.tests.test_x`) or was skipped on import
(`unittest.loader.ModuleSkipped.tests.test_x`) are named after the module
(`tests.test_x`). A failing subtest is a result of its own
(`tests.test_x.T.test_m (i=1)`); a failing class or module fixture is
unittest's `_ErrorHolder` (`setUpClass (tests.test_x.T)`).

Crashes. A child tells the parent, over a private pipe, `{"start": ID}`
before each test, `{"stop": ID}` after it, each result, and `{"done": true}`
at the end; only lines written by the child's own pid count (a test that
forks and carries on cannot duplicate results). The parent learns that a
child exited from SIGCHLD (through `signal.set_wakeup_fd`, so it never
polls), and then kills the child's process group, which the child leads, so
nothing a test started outlives its file. A child that exited without its
`done` line gets one `error` result: for the test that had started and not
stopped, else for the module (`tests.sub.test_x`), saying how it ended
("the test process was killed by signal SIGSEGV ...", "exited with code 3",
"exited before the test driver finished", "was killed after 12.0 s because
it ran out of time" with `--timeout`, a wall-clock limit per child) and the
end of what it wrote (faulthandler's traceback goes there). When a test was
running, a fresh child then runs the file again without every test that had
started, up to _MAX_RESTARTS times, and stops early (with a note) if a test
that was left out runs again. A file the parent cannot fork a child for
(the process limit used up) is retried with back-off, and after
_FORK_ATTEMPTS failures while no other child runs, reported as one error.

Output. Nothing a test prints reaches the parent's stdout: a child's
descriptors 0, 1 and 2 are /dev/null and a private temporary file. When a
test (or a class or module fixture) starts, that file is emptied; what the
test printed is added to its message if it fails or errors, and to the crash
message if it kills its child. This is capture at the file descriptor level,
not unittest's `buffer=True`: tests see the same `sys.stdout` and
`sys.stderr` objects they would see under plain unittest (real files, with
`fileno()`). A child may not write files larger than _FILE_SIZE_LIMIT
(RLIMIT_FSIZE, with SIGXFSZ ignored): a test that prints without end gets
write errors instead of filling the disk.

This file runs under Python 3.8+, only uses the standard library, and is
pure ASCII without three single quotes in a row (bootstrap.py needs both).
"""

import errno
import faulthandler
import json
import os
import resource
import selectors
import signal
import sys
import tempfile
import time
import traceback
import unittest
import warnings

# discover's pattern, as `-s tests -t .` uses it.
_PATTERN = "test*.py"
_START = "tests"

# The protocol version on the first line.
_PROTOCOL = 2

# The selector's mark for stdin (with --more).
_STDIN = object()

# When several outcomes are reported for one test (an assertion fails and
# then tearDown raises, say), the worst one is the test's outcome.
_SEVERITY = ["pass", "skip", "xfail", "xpass", "fail", "error"]

# The loader's placeholder classes, whose ids are renamed after the module.
_PLACEHOLDERS = ("unittest.loader._FailedTest.", "unittest.loader.ModuleSkipped.")

# How much of a test's captured output goes into its message: the end,
# where what went wrong usually is.
_OUTPUT_TAIL = 20000

# How much of a dead child's output goes into its crash message (bytes, as
# the plugin's STDERR_TAIL): enough for faulthandler's traceback.
_CRASH_TAIL = 4000

# How often a file is forked again after crashes before its remaining tests
# are given up on (the plugin's MAX_RESTARTS before this driver).
_MAX_RESTARTS = 100

# Fork attempts for one file while nothing else of ours runs, and the
# back-off between attempts (doubling up to the cap).
_FORK_ATTEMPTS = 6
_FORK_BACKOFF = 0.05
_FORK_BACKOFF_CAP = 1.6

# The largest file a child may write: bounds a test's runaway output.
_FILE_SIZE_LIMIT = 64 * 1024 * 1024

# At most this much is read from a dead child's pipe: the child's own lines
# fit in the pipe's buffer, anything beyond comes from a stray writer.
_DRAIN_LIMIT = 4 * 1024 * 1024


def _clean(text):
    """Makes `text` valid UTF-8: lone surrogates (from undecodable bytes)
    would otherwise produce JSON that strict parsers reject."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def _millis(since):
    return max(0, int((time.perf_counter() - since) * 1000))


def _seconds(ms):
    """`12.0 s`, as the plugin has always written durations in messages."""
    return "%d.%d s" % (ms // 1000, (ms % 1000) // 100)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_id(test):
    """The id Kiln reports for `test`."""
    raw = test.id()
    for prefix in _PLACEHOLDERS:
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def module_name(path):
    """The module name of FILE, for errors no test can be blamed for:
    `tests/sub/test_x.py` is `tests.sub.test_x`, `tests/sub/__init__.py`
    is `tests.sub`."""
    name = os.path.normpath(path)
    if name.endswith(".py"):
        name = name[:-3]
    if os.path.basename(name) == "__init__":
        name = os.path.dirname(name)
    return name.replace(os.sep, ".")


# ---------------------------------------------------------------------------
# The child: runs one file and reports to the parent over a pipe.


class _LostPipe(RuntimeError):
    """The child can no longer reach the parent: a test closed the pipe."""


class _Emitter:
    """Writes protocol lines to the pipe to the parent, from this process
    only: a process a test forked from it stays silent."""

    def __init__(self, fd):
        self._fd = fd
        self._pid = os.getpid()

    def __call__(self, **fields):
        if os.getpid() != self._pid:
            return
        data = (json.dumps(fields) + "\n").encode("ascii")
        try:
            _write_all(self._fd, data)
        except OSError as error:
            raise _LostPipe(
                "the test driver lost its pipe to the parent process (descriptor %d): "
                "a test may have closed it" % self._fd
            ) from error

    def result(self, test_id, outcome, duration_ms, message):
        self(id=_clean(test_id), outcome=outcome, duration_ms=duration_ms, message=_clean(message))


def _flush_all():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            # A test may have closed or replaced a stream; what it held is
            # lost either way.
            pass


class _Capture:
    """The child's private output file, which descriptors 1 and 2 point at.
    `start` empties it when a test or a fixture starts (and points 1 and 2
    back at it, whatever the previous test did to them); `text` reads what
    was written since."""

    def __init__(self, fd):
        # The file is opened in append mode: after truncating, writes
        # through every duplicate descriptor start again at the beginning.
        self._fd = fd
        self._running = False

    def start(self):
        if self._running:
            return
        _flush_all()
        os.ftruncate(self._fd, 0)
        self._point()
        self._running = True

    def text(self):
        """What was written since `start`, at most its last _OUTPUT_TAIL
        bytes; nothing when no capture is running."""
        if not self._running:
            return ""
        _flush_all()
        return _tail(self._fd, _OUTPUT_TAIL)

    def stop(self):
        if not self._running:
            return
        _flush_all()
        self._point()
        self._running = False

    def _point(self):
        os.dup2(self._fd, 1)
        os.dup2(self._fd, 2)


def _tail(fd, limit):
    """The last `limit` bytes of the file `fd` as text, `...` first if cut."""
    size = os.fstat(fd).st_size
    start = max(0, size - limit)
    data = os.pread(fd, size - start, start)
    text = data.decode("utf-8", "replace")
    return ("...\n" + text) if start else text


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


def _prepare_loader():
    """unittest.defaultTestLoader (the one `unittest.main` uses, and that
    load_tests functions may reach for) in the state discover leaves it in.
    Called in the child: the parent's loader stays untouched."""
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


def _run(suite, emit, capture):
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


def _run_file(path, skip, emit, capture):
    """Runs FILE's tests except those in `skip`, as one process per file did."""
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
                _run(_without(tests, skip), emit, capture)
    emit(done=True)


# The child's faulthandler file, kept referenced for the child's lifetime.
_fault_file = None


def _child(path, skip, pipe, output, inherited):
    """The forked child's whole life: never returns into the parent's code,
    not even in a process a test forks from it."""
    global _fault_file
    code = 1
    try:
        # Its own process group, so that killing the group kills exactly
        # this file's processes. (The parent calls setpgid too: whichever
        # runs first wins the race.)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(output, 1)
        os.dup2(output, 2)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = _FILE_SIZE_LIMIT if hard == resource.RLIM_INFINITY else min(_FILE_SIZE_LIMIT, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        # A crash in C code leaves a traceback where the parent looks.
        _fault_file = os.fdopen(os.dup(output), "w")
        faulthandler.enable(file=_fault_file)
        _run_file(path, skip, _Emitter(pipe), _Capture(output))
        code = 0
    except SystemExit as exit:
        # As the interpreter ends on an uncaught SystemExit.
        if exit.code is None:
            code = 0
        elif isinstance(exit.code, int):
            code = exit.code
        else:
            _print_error(str(exit.code))
    except BaseException:
        _print_error(traceback.format_exc())
    finally:
        _flush_all()
        os._exit(code & 0xFF)


def _print_error(text):
    try:
        _write_all(2, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


# ---------------------------------------------------------------------------
# The parent: forks the children, reads them, reports.


class _File:
    """One FILE argument, across the children that run it."""

    def __init__(self, path):
        self.path = path
        self.module = module_name(path)
        # Tests the next child leaves out: every test a dead child started.
        self.skip = set()
        # Ids already reported for this file.
        self.reported = set()
        self.restarts = 0
        self.fork_failures = 0
        # When the next fork may be tried (after a failed one).
        self.not_before = 0.0


class _Fork:
    """One child process running one file."""

    def __init__(self, file, pid, pipe, output, deadline):
        self.file = file
        self.pid = pid
        # The read end of the child's protocol pipe, and its output file.
        self.pipe = pipe
        self.output = output
        self.started_at = time.monotonic()
        self.deadline = deadline
        self.buffer = b""
        self.open = True
        # The test that started and has not stopped, and when it started.
        self.running = None
        self.running_since = self.started_at
        self.started = []
        self.results = 0
        self.done = False
        self.timed_out = False


class _Usage(Exception):
    pass


_USAGE = "usage: python3 - [--slots N] [--timeout SECONDS] [--more] [--] FILE... < bootstrap and driver.py"


def _parse_args(args):
    slots, timeout, more, files = 1, None, False, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            files.extend(args[i + 1:])
            break
        if arg == "--more":
            more = True
        elif arg.startswith("--"):
            name, equals, value = arg.partition("=")
            if name not in ("--slots", "--timeout"):
                raise _Usage("unknown option %s" % arg)
            if not equals:
                i += 1
                if i == len(args):
                    raise _Usage("%s needs a value" % name)
                value = args[i]
            try:
                if name == "--slots":
                    slots = int(value)
                    ok = slots >= 1
                else:
                    timeout = float(value)
                    ok = timeout > 0
            except ValueError:
                ok = False
            if not ok:
                raise _Usage("%s wants a positive number, not %r" % (name, value))
        else:
            files.append(arg)
        i += 1
    return slots, timeout, more, files


def _take_stdout():
    """Keeps fd 1 for the protocol and sends everything else to fd 2."""
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    return private


def _imitate_unittest_main():
    """Makes this process look like `python -m unittest discover -s tests -t .`."""
    sys.argv = [os.path.basename(sys.executable) + " -m unittest", "discover", "-s", _START, "-t", "."]
    # `-m` puts the absolute working directory first on sys.path; `-c` and
    # `-` an empty string. discover then finds the top-level directory there
    # and adds nothing.
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.getcwd()


# How pyproject.toml and setup.cfg say "packages are under src", once
# whitespace is removed and quotes are double: setuptools' `package-dir =
# {"" = "src"}` and `where = ["src"]`, setup.cfg's `package_dir = =src`,
# hatch's `packages = ["src/foo"]`, poetry's `from = "src"`, pdm's
# `package-dir = "src"`.
_SRC_DECLARATIONS = ('""="src"', 'where=["src"', '["src/', 'from="src"', 'package-dir="src"', "package_dir==src")


def _src_layout(root):
    """The `src` directory to put on sys.path, or None.

    A repository has a src layout when `root/src` is a directory and either
    pyproject.toml or setup.cfg names `src` as where packages are (a plain
    text check for the usual spellings, _SRC_DECLARATIONS), or `src` holds a package (a directory with
    `__init__.py`) or a module (`*.py`) that the root does not hold too.
    """
    src = os.path.join(root, "src")
    if not os.path.isdir(src):
        return None
    for config in ("pyproject.toml", "setup.cfg"):
        try:
            with open(os.path.join(root, config), encoding="utf-8", errors="replace") as f:
                # Without whitespace, and with one kind of quotes.
                text = "".join(f.read().split()).replace("'", '"')
        except OSError:
            continue
        if any(spelling in text for spelling in _SRC_DECLARATIONS):
            return src
    try:
        names = os.listdir(src)
    except OSError:
        return None
    for name in names:
        if name.endswith(".py") and name[:-3].isidentifier():
            if not os.path.exists(os.path.join(root, name)):
                return src
        elif name.isidentifier() and os.path.isfile(os.path.join(src, name, "__init__.py")):
            if not os.path.isfile(os.path.join(root, name, "__init__.py")):
                return src
    return None


class _Parent:
    """The scheduler: forks children, multiplexes their pipes, reports."""

    def __init__(self, out, slots, timeout, paths, more=False):
        self._out = out
        self._slots = slots
        self._timeout = timeout
        self._queue = []
        self._seen = set()
        self._add(paths)
        self._forks = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # With --more: stdin stays open for more files (see the module doc),
        # and the buffered part of a line not yet ended.
        self._more = more
        self._more_buffer = b""
        self._idle = False
        if more:
            os.set_blocking(0, False)
            self._selector.register(0, selectors.EVENT_READ, _STDIN)

    def _add(self, paths):
        """Queues each path not seen before."""
        for path in paths:
            if path not in self._seen:
                self._seen.add(path)
                self._queue.append(_File(path))

    def _write(self, **fields):
        _write_all(self._out, (json.dumps(fields) + "\n").encode("ascii"))

    def run(self):
        # Stopped from outside, the parent takes its children down with it
        # (see the `finally` below).
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _terminate)
        # The handler does nothing: the signal's byte on the wakeup pipe
        # wakes the select below, which then reaps.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wake_w)
        self._write(driver=_PROTOCOL, python="%d.%d.%d" % tuple(sys.version_info[:3]))
        try:
            while True:
                self._start_ready()
                if not (self._queue or self._forks):
                    if not self._more:
                        break
                    if not self._idle:
                        self._idle = True
                        self._write(idle=True)
                for key, _ in self._selector.select(self._wait()):
                    if key.data is None:
                        self._drain_wakeups()
                    elif key.data is _STDIN:
                        self._read_more()
                    else:
                        self._read(key.data)
                self._reap()
                self._expire()
        finally:
            # Only reached with children left when the parent itself fails
            # or is interrupted: take them down with it.
            for pid in list(self._forks):
                _kill_group(pid)
        self._write(done=True)
        return 0

    def _wait(self):
        """How long select may block: until the next deadline or retry."""
        times = [f.deadline for f in self._forks.values() if f.deadline is not None]
        if self._queue and len(self._forks) < self._slots:
            times.append(self._queue[0].not_before)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _read_more(self):
        """Queues the files of each whole line on stdin; at its end, no more
        will come. A line that is not a JSON list of strings is a usage
        error: the plugin wrote it, not a test."""
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self._more = False
            self._selector.unregister(0)
            if self._more_buffer.strip():
                raise _Usage("stdin ended inside a line of files")
            return
        lines = (self._more_buffer + data).split(b"\n")
        self._more_buffer = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                paths = json.loads(line)
            except ValueError:
                paths = None
            if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
                raise _Usage("a line on stdin is not a JSON list of files: %r" % line[:200])
            _warm_import_caches(paths)
            self._add(paths)
            self._idle = False

    def _drain_wakeups(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # Starting children.

    def _start_ready(self):
        while self._queue and len(self._forks) < self._slots:
            file = self._queue[0]
            if file.not_before > time.monotonic():
                return
            try:
                self._fork(file)
            except OSError as error:
                file.fork_failures += 1
                if file.fork_failures >= _FORK_ATTEMPTS and not self._forks:
                    self._queue.pop(0)
                    message = (
                        "the test driver could not start a process for this file (%d attempts): %s "
                        "(the sandbox's process limit may be used up, e.g. by processes a test left behind)"
                        % (file.fork_failures, error)
                    )
                    self._report(file, file.module, "error", 0, message)
                    self._write(**{"file-done": file.path})
                    continue
                delay = min(_FORK_BACKOFF * 2 ** (file.fork_failures - 1), _FORK_BACKOFF_CAP)
                file.not_before = time.monotonic() + delay
                return
            self._queue.pop(0)

    def _fork(self, file):
        pipe_r, pipe_w = os.pipe()
        output = None
        try:
            output = tempfile.TemporaryFile(mode="a+b", buffering=0)
            inherited = [self._out, self._wake_r, self._wake_w, self._selector.fileno(), pipe_r]
            for fork in self._forks.values():
                inherited.extend((fork.pipe, fork.output.fileno()))
            pid = os.fork()
        except BaseException:
            os.close(pipe_r)
            os.close(pipe_w)
            if output is not None:
                output.close()
            raise
        if pid == 0:
            _child(file.path, file.skip, pipe_w, output.fileno(), inherited)
        try:
            os.setpgid(pid, pid)
        except OSError:
            # The child got there first, or is already gone.
            pass
        os.close(pipe_w)
        os.set_blocking(pipe_r, False)
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        fork = _Fork(file, pid, pipe_r, output, deadline)
        self._forks[pid] = fork
        self._selector.register(pipe_r, selectors.EVENT_READ, fork)

    # Reading children.

    def _read(self, fork, limit=None):
        """Reads what the child's pipe holds, handling complete lines."""
        total = 0
        while fork.open:
            try:
                data = os.read(fork.pipe, 65536)
            except BlockingIOError:
                return
            if not data:
                fork.open = False
                self._selector.unregister(fork.pipe)
                break
            lines = (fork.buffer + data).split(b"\n")
            fork.buffer = lines.pop()
            for line in lines:
                self._line(fork, line)
            total += len(data)
            if limit is None or total >= limit:
                return

    def _line(self, fork, line):
        try:
            event = json.loads(line)
        except ValueError:
            # Not the child's: its lines are whole JSON objects. Something a
            # test forked wrote to the inherited descriptor.
            return
        if not isinstance(event, dict):
            return
        if "start" in event:
            fork.running = event["start"]
            fork.running_since = time.monotonic()
            fork.started.append(event["start"])
        elif "stop" in event:
            fork.running = None
        elif "outcome" in event:
            fork.results += 1
            self._report(fork.file, event["id"], event["outcome"], event["duration_ms"], event["message"])
        elif "done" in event:
            fork.done = True

    def _report(self, file, test, outcome, duration_ms, message):
        if test in file.reported:
            return
        file.reported.add(test)
        self._write(file=file.path, id=test, outcome=outcome, duration_ms=duration_ms, message=message)

    # Ending children.

    def _reap(self):
        """Handles every child that exited, and reaps the orphans a test left
        (as PID 1 of the sandbox's PID namespace, they become ours): a
        zombie still counts against the process limit."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            fork = self._forks.get(info.si_pid)
            if fork is None:
                try:
                    os.waitpid(info.si_pid, 0)
                except ChildProcessError:
                    pass
            else:
                self._finish(fork)

    def _expire(self):
        now = time.monotonic()
        for fork in self._forks.values():
            if fork.deadline is not None and fork.deadline <= now and not fork.timed_out:
                fork.timed_out = True
                _kill_group(fork.pid)

    def _finish(self, fork):
        # The child is a zombie until waitpid below, so its process group
        # id cannot have been reused: kill what is left in it, then read
        # what it wrote (all of it is in the pipe now), then reap it.
        _kill_group(fork.pid)
        self._read(fork, limit=_DRAIN_LIMIT)
        _, status = os.waitpid(fork.pid, 0)
        del self._forks[fork.pid]
        if fork.open:
            self._selector.unregister(fork.pipe)
        os.close(fork.pipe)
        file = fork.file
        if fork.done:
            fork.output.close()
            self._write(**{"file-done": file.path})
            return
        again = False
        note = ""
        if fork.running is not None:
            if fork.running in file.skip:
                note = "%s ran again although it was left out" % fork.running
            elif file.restarts >= _MAX_RESTARTS:
                note = "the file was restarted %d times already" % _MAX_RESTARTS
            else:
                again = True
        message = self._crash_message(fork, status)
        if note:
            message += "\n\nThe file's remaining tests were not run: %s." % note
        fork.output.close()
        blame = fork.running
        if blame is None or blame in file.reported:
            blame = file.module
            number = 1
            while blame in file.reported:
                number += 1
                blame = "%s (crash %d)" % (file.module, number)
        since = fork.running_since if fork.running is not None else fork.started_at
        duration = max(0, int((time.monotonic() - since) * 1000))
        self._report(file, blame, "error", duration, message)
        if again:
            file.restarts += 1
            file.skip.update(fork.started)
            file.not_before = 0.0
            self._queue.insert(0, file)
        else:
            self._write(**{"file-done": file.path})
        # A fork that failed for want of processes may succeed now.
        if self._queue:
            self._queue[0].not_before = min(self._queue[0].not_before, time.monotonic())

    def _crash_message(self, fork, status):
        elapsed = int((time.monotonic() - fork.started_at) * 1000)
        if fork.timed_out:
            problem = "the test process was killed after %s because it ran out of time" % _seconds(elapsed)
        elif os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = str(signum)
            problem = "the test process was killed by signal %s (a crash in C code, or the out-of-memory killer)" % name
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            problem = "the test process exited with code %d" % os.WEXITSTATUS(status)
        else:
            problem = "the test process exited before the test driver finished (a test may have called os._exit)"
        if fork.running is not None:
            problem += " while running %s" % fork.running
        elif fork.results:
            problem += " after %d results; any remaining tests did not run" % fork.results
        problem += "."
        try:
            output = _tail(fork.output.fileno(), _CRASH_TAIL).rstrip()
        except OSError:
            output = ""
        if output:
            return problem + "\n\nThe end of its output (stdout and stderr):\n" + _clean(output)
        return problem + "\n\nIt wrote nothing to stdout or stderr."


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        # Nothing left in the group (or not ours: never signalled broadly).
        pass


def _warm_import_caches(files):
    """Lists, once in the parent, the directories the children will import
    the batch's files from: each directory's path finder (what `import`
    consults, with its listing of the directory) is made and filled here,
    and every forked child inherits it. Otherwise each child lists the
    directory itself, which costs in proportion to its size: with 20,000
    test files in `tests/`, some 8 ms a file, a commit's time growing with
    the square of its files. Nothing is imported: no test code runs in the
    parent. (A finder checks the directory's mtime on each lookup, so a
    directory that changes is listed again.)"""
    dirs = {os.path.abspath(".")}
    dirs.update(os.path.dirname(os.path.abspath(f)) for f in files)
    for d in sorted(dirs):
        finder = sys.path_importer_cache.get(d)
        if finder is None:
            for hook in sys.path_hooks:
                try:
                    finder = hook(d)
                    break
                except ImportError:
                    continue
            sys.path_importer_cache[d] = finder
        if finder is not None and hasattr(finder, "find_spec"):
            try:
                # A name no file has: the lookup fills the finder's listing.
                finder.find_spec("__kiln_no_such_module__")
            except Exception:
                pass


def main(argv):
    try:
        slots, timeout, more, files = _parse_args(argv[1:])
    except _Usage as error:
        sys.stderr.write("%s\n%s\n" % (error, _USAGE))
        return 2
    out = _take_stdout()
    _imitate_unittest_main()
    src = _src_layout(os.getcwd())
    if src is not None and src not in sys.path:
        sys.path.insert(1, src)
    _warm_import_caches(files)
    try:
        return _Parent(out, slots, timeout, files, more).run()
    except _Usage as error:
        sys.stderr.write("%s\n%s\n" % (error, _USAGE))
        return 2


if __name__ == "__main__":
    _status = main(sys.argv)
    # End without the interpreter's finalization (module teardown, garbage
    # collection, atexit): it took 13 to 35 ms after `done` on the
    # development machine, on the path from every commit to its results,
    # and nothing here needs it. Everything was written with os.write;
    # stderr is flushed first. (An exception from main still ends the
    # normal way, with its traceback.)
    _flush_all()
    os._exit(_status)
