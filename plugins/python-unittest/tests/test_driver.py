# Run: python3 -m unittest discover -s plugins/python-unittest/tests -t plugins/python-unittest/tests -v
# (KILN_TEST_PYTHON=/path/to/python3 runs the driver under another interpreter; these tests need 3.8+.)
"""Tests of the python-unittest driver (src/driver.py behind src/bootstrap.py).

Every test builds a temporary repository with a `tests/` package, runs the
real driver the way the plugin does (`PYTHON -c LOADER [options] FILE...`
from the repository root, stdin = the bytes bootstrap.py's docstring prescribes, in
the environment Kiln's sandbox gives a command) and checks the JSON lines
it prints: exact outcomes per test, and the protocol's order properties
(`check_protocol`), which every run is held to.

The interpreter under test is $KILN_TEST_PYTHON, or the one running these
tests. Tests that need something this machine may lack (an old interpreter
for the version guard, root for a pids cgroup and a PID namespace) say so
when they skip.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = HERE.parent
DRIVER = (PLUGIN / "src" / "driver.py").read_bytes()
BOOTSTRAP = (PLUGIN / "src" / "bootstrap.py").read_bytes()
PYTHON = os.environ.get("KILN_TEST_PYTHON", sys.executable)
PYENV = Path("/root/.pyenv/versions")


def stdin_bytes():
    """Exactly what the plugin writes to the interpreter's stdin."""
    return b"_KILN_DRIVER = r'''" + DRIVER + b"'''\n" + BOOTSTRAP


# The plugin's one-line loader, as src/lib.rs spells it: it reads exactly
# the program, so that with --more what follows on stdin is files.
_LOADER_FORMAT = re.search(r'format!\("(import sys; exec\(sys\.stdin\.read\(\{\}\)\))"', (PLUGIN / "src" / "lib.rs").read_text())
LOADER = _LOADER_FORMAT.group(1).replace("{}", str(len(stdin_bytes())))


def sandbox_env(repo, tmpdir):
    """The environment Kiln's sandbox gives a test command."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "HOME": str(repo),
        "TMPDIR": str(tmpdir),
    }


class Run:
    """What one driver run printed, parsed."""

    def __init__(self, completed, args):
        self.args = args
        self.returncode = completed.returncode
        self.stdout = completed.stdout.decode("utf-8")
        self.stderr = completed.stderr.decode("utf-8", "replace")
        self.lines = [json.loads(line) for line in self.stdout.splitlines()]
        self.results = [line for line in self.lines if "outcome" in line]

    def of(self, file):
        """{id: result} for `file`."""
        return {r["id"]: r for r in self.results if r["file"] == file}

    def outcomes(self, file):
        return {i: r["outcome"] for i, r in self.of(file).items()}

    def describe(self):
        return "exit %s\nstdout:\n%s\nstderr:\n%s" % (self.returncode, self.stdout, self.stderr[-3000:])


class DriverTest(unittest.TestCase):
    """Builds repositories and runs the driver on them."""

    maxDiff = None

    def setUp(self):
        scratch = Path(tempfile.mkdtemp(prefix="kiln-driver-test-"))
        self.addCleanup(shutil.rmtree, scratch, ignore_errors=True)
        self.repo = scratch / "repo"
        self.tmpdir = scratch / "tmp"
        self.repo.mkdir()
        self.tmpdir.mkdir()

    def write(self, files):
        """Writes {relative path: source} (dedented) into the repository;
        tests/__init__.py is created empty unless given."""
        files = dict(files)
        files.setdefault("tests/__init__.py", "")
        for name, text in files.items():
            path = self.repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))

    def run_driver(self, *args, python=PYTHON, timeout=120, wrap=(), preexec_fn=None, check=True, env=None):
        """Runs the driver with `args` (options and files) and checks the
        protocol; returns the parsed Run. `env` adds to the sandbox's
        environment."""
        completed = subprocess.run(
            [*wrap, python, "-c", LOADER, *args],
            input=stdin_bytes(),
            cwd=self.repo,
            env={**sandbox_env(self.repo, self.tmpdir), **(env or {})},
            capture_output=True,
            timeout=timeout,
            preexec_fn=preexec_fn,
        )
        try:
            run = Run(completed, args)
        except ValueError as error:
            self.fail("the driver printed something that is not JSON (%s):\n%s" % (error, completed.stdout[-3000:]))
        if check:
            self.check_protocol(run)
        return run

    def check_protocol(self, run):
        """The order properties every run has, whatever its tests do."""
        files = [a for a in run.args if not a.startswith("--") and not _is_option_value(run.args, a)]
        self.assertEqual(run.returncode, 0, run.describe())
        lines = run.lines
        self.assertGreaterEqual(len(lines), 2, run.describe())
        version = "%d.%d.%d" % sys.version_info[:3] if PYTHON == sys.executable else lines[0].get("python")
        self.assertEqual(lines[0], {"driver": 2, "python": version})
        self.assertEqual(lines[-1], {"done": True})
        done = set()
        ids = set()
        for line in lines[1:-1]:
            if "file-done" in line:
                self.assertEqual(set(line), {"file-done"})
                self.assertNotIn(line["file-done"], done, "two file-done lines for one file")
                done.add(line["file-done"])
            else:
                self.assertEqual(set(line), {"file", "id", "outcome", "duration_ms", "message"}, line)
                self.assertIn(line["file"], files)
                self.assertNotIn(line["file"], done, "a result after its file's file-done: %s" % line)
                self.assertIn(line["outcome"], ["pass", "fail", "error", "skip", "xfail", "xpass"])
                self.assertIsInstance(line["duration_ms"], int)
                key = (line["file"], line["id"])
                self.assertNotIn(key, ids, "an id reported twice within a file: %s" % (key,))
                ids.add(key)
        self.assertEqual(done, set(files), "every file gets exactly one file-done")

    def assertCrash(self, result, *phrases):
        self.assertEqual(result["outcome"], "error", result)
        for phrase in phrases:
            self.assertIn(phrase, result["message"])


def _is_option_value(args, arg):
    """Whether `arg` is the value of a --slots or --timeout before it."""
    indices = [i for i, a in enumerate(args) if a == arg]
    return any(i > 0 and args[i - 1] in ("--slots", "--timeout") for i in indices)


MIXED = """
    import unittest

    class T(unittest.TestCase):
        def test_pass(self):
            pass

        def test_fail(self):
            print("printed by test_fail")
            self.assertEqual(1, 2)

        def test_error(self):
            raise ValueError("bad")

        @unittest.skip("not today")
        def test_skip(self):
            pass

        @unittest.expectedFailure
        def test_xfail(self):
            self.fail("expected")

        @unittest.expectedFailure
        def test_xpass(self):
            pass

        def test_sub(self):
            for i in range(3):
                with self.subTest(i=i):
                    self.assertNotEqual(i, 1)

        def test_sub_same(self):
            for i in range(2):
                with self.subTest(k="same"):
                    self.fail("twice with one description")
"""


class Outcomes(DriverTest):
    def test_every_outcome_in_one_file(self):
        self.write({"tests/test_m.py": MIXED})
        run = self.run_driver("tests/test_m.py")
        p = "tests.test_m.T."
        self.assertEqual(
            run.outcomes("tests/test_m.py"),
            {
                p + "test_pass": "pass",
                p + "test_fail": "fail",
                p + "test_error": "error",
                p + "test_skip": "skip",
                p + "test_xfail": "xfail",
                p + "test_xpass": "xpass",
                p + "test_sub (i=1)": "fail",
                p + "test_sub_same (k='same')": "fail",
            },
        )
        results = run.of("tests/test_m.py")
        self.assertIn("printed by test_fail", results[p + "test_fail"]["message"])
        self.assertIn("AssertionError: 1 != 2", results[p + "test_fail"]["message"])
        self.assertEqual(results[p + "test_skip"]["message"], "not today")

    def test_files_discover_does_not_reach_get_only_their_file_done(self):
        self.write({
            "tests/broken/__init__.py": "import no_such_module\n",
            "tests/broken/test_x.py": "import unittest\nclass T(unittest.TestCase):\n    def test(self): pass\n",
            "tests/plain/test_y.py": "import unittest\nclass T(unittest.TestCase):\n    def test(self): pass\n",
        })
        run = self.run_driver("tests/broken/test_x.py", "tests/plain/test_y.py", "tests/broken/__init__.py")
        self.assertEqual(run.of("tests/broken/test_x.py"), {})
        self.assertEqual(run.of("tests/plain/test_y.py"), {})
        self.assertEqual(run.outcomes("tests/broken/__init__.py"), {"tests.broken": "error"})
        self.assertIn("No module named 'no_such_module'", run.of("tests/broken/__init__.py")["tests.broken"]["message"])

    def test_a_file_given_twice_runs_once(self):
        self.write({"tests/test_a.py": "import unittest\nclass T(unittest.TestCase):\n    def test(self): pass\n"})
        run = self.run_driver("tests/test_a.py", "tests/test_a.py")
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test": "pass"})

    def test_no_files(self):
        run = self.run_driver()
        self.assertEqual(len(run.lines), 2)

    def test_with_more_the_files_on_stdin_run_in_the_same_interpreter_when_it_is_idle(self):
        test = "import os, unittest\nclass T(unittest.TestCase):\n    def test(self):\n        print(os.getppid())\n        self.fail()\n"
        self.write({"tests/test_%s.py" % n: test for n in "abc"})
        process = subprocess.Popen(
            [PYTHON, "-c", LOADER, "--more", "--", "tests/test_a.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=self.repo, env=sandbox_env(self.repo, self.tmpdir),
        )
        process.stdin.write(stdin_bytes())
        process.stdin.flush()

        def until_idle():
            lines = []
            while True:
                line = json.loads(process.stdout.readline())
                if line == {"idle": True}:
                    return lines
                lines.append(line)

        first = until_idle()
        self.assertEqual(first[0]["driver"], 2)
        self.assertEqual([l.get("file-done") for l in first[1:]], [None, "tests/test_a.py"])
        # Two files in one line, the first given again (it runs once).
        process.stdin.write(b'["tests/test_b.py", "tests/test_a.py", "tests/test_c.py"]\n')
        process.stdin.flush()
        second = until_idle()
        self.assertEqual([l.get("file-done") for l in second], [None, "tests/test_b.py", None, "tests/test_c.py"])
        # Every file ran in a child of this one interpreter.
        parents = {l["message"].split("Output (stdout and stderr):\n")[1].split()[0] for l in first[1:] + second if "message" in l}
        self.assertEqual(parents, {str(process.pid)})
        process.stdin.close()
        with process.stdout, process.stderr:
            out, err = process.stdout.read(), process.stderr.read()
        self.assertEqual((process.wait(timeout=60), out, err), (0, b'{"done": true}\n', b""))

    def test_with_more_a_line_that_is_not_a_list_of_files_is_a_usage_error(self):
        process = subprocess.run(
            [PYTHON, "-c", LOADER, "--more"], input=stdin_bytes() + b'{"not": "a list"}\n', capture_output=True,
            cwd=self.repo, env=sandbox_env(self.repo, self.tmpdir), timeout=60,
        )
        self.assertEqual(process.returncode, 2, process.stderr)
        self.assertIn(b"a line on stdin is not a JSON list of files", process.stderr)
        self.assertEqual(process.stdout.splitlines()[1:], [b'{"idle": true}'])

    def test_usage_errors(self):
        for args in (["--slots", "0", "x"], ["--slots"], ["--bogus", "x"], ["--timeout", "soon", "x"]):
            run = self.run_driver(*args, check=False)
            self.assertEqual((run.returncode, run.lines), (2, []), args)
            self.assertIn("usage:", run.stderr)

    def test_the_parent_ends_without_interpreter_finalization(self):
        # Finalization took 13 to 35 ms after `done`, on the path from every
        # commit to its results: the parent ends with os._exit instead. An
        # atexit handler (installed by a sitecustomize, before the driver
        # runs) shows whether finalization ran; the parent's stderr must
        # still arrive whole.
        site = self.tmpdir / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import atexit, os, sys\n"
            "sys.stderr.write('buffered before the end\\n')\n"
            "atexit.register(lambda: os.write(2, b'finalized\\n'))\n"
        )
        self.write({"tests/test_a.py": """
            import unittest
            class T(unittest.TestCase):
                def test_ok(self):
                    pass
            """})
        run = self.run_driver("tests/test_a.py", env={"PYTHONPATH": str(site)})
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_ok": "pass"})
        self.assertIn("buffered before the end", run.stderr)
        self.assertNotIn("finalized", run.stderr)
        # A usage error ends the same way, its message flushed.
        run = self.run_driver("--bogus", env={"PYTHONPATH": str(site)}, check=False)
        self.assertEqual(run.returncode, 2)
        self.assertIn("usage:", run.stderr)
        self.assertNotIn("finalized", run.stderr)


class Concurrency(DriverTest):
    def test_results_of_concurrent_files_go_to_their_own_file(self):
        files = {}
        for n in range(4):
            methods = "".join(
                "    def test_%d(self):\n        print('output of file %d test %d')\n        time.sleep(0.02)\n%s"
                % (t, n, t, "        self.fail('file %d')\n" % n if t == 4 else "")
                for t in range(5)
            )
            files["tests/test_f%d.py" % n] = "import time, unittest\nclass T(unittest.TestCase):\n" + methods
        self.write(files)
        names = sorted(files)
        run = self.run_driver("--slots", "3", *names)
        for n, name in enumerate(names):
            expected = {"tests.test_f%d.T.test_%d" % (n, t): "pass" for t in range(4)}
            expected["tests.test_f%d.T.test_4" % n] = "fail"
            self.assertEqual(run.outcomes(name), expected)
            message = run.of(name)["tests.test_f%d.T.test_4" % n]["message"]
            self.assertIn("output of file %d test 4" % n, message)
            self.assertIn("AssertionError: file %d" % n, message)
            for other in range(4):
                if other != n:
                    self.assertNotIn("file %d" % other, message)

    # Each test records when it ran into stamps/; with two slots, each of the
    # two files waits (with a generous limit) until the other has started,
    # which only passes if they run at the same time.
    WAITS_FOR_OTHER = """
        import os, time, unittest
        STAMPS = os.path.join(os.path.dirname(__file__), os.pardir, "stamps")

        class T(unittest.TestCase):
            def test_meet(self):
                me, other = %r, %r
                with open(os.path.join(STAMPS, me), "w") as f:
                    f.write(str(time.time()))
                deadline = time.monotonic() + %s
                while not os.path.exists(os.path.join(STAMPS, other)):
                    self.assertLess(time.monotonic(), deadline, "the other file did not start meanwhile")
                    time.sleep(0.01)
    """

    def test_two_slots_run_two_files_at_once(self):
        (self.repo / "stamps").mkdir()
        self.write({
            "tests/test_a.py": self.WAITS_FOR_OTHER % ("a", "b", 30),
            "tests/test_b.py": self.WAITS_FOR_OTHER % ("b", "a", 30),
        })
        run = self.run_driver("--slots", "2", "tests/test_a.py", "tests/test_b.py")
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_meet": "pass"})
        self.assertEqual(run.outcomes("tests/test_b.py"), {"tests.test_b.T.test_meet": "pass"})

    def test_one_slot_runs_one_file_at_a_time(self):
        (self.repo / "stamps").mkdir()
        self.write({
            "tests/test_a.py": self.WAITS_FOR_OTHER % ("a", "b", 0.5),
            "tests/test_b.py": self.WAITS_FOR_OTHER % ("b", "a", 0.5),
        })
        run = self.run_driver("tests/test_a.py", "tests/test_b.py")
        # a runs alone and gives up waiting; b then finds a's stamp.
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_meet": "fail"})
        self.assertEqual(run.outcomes("tests/test_b.py"), {"tests.test_b.T.test_meet": "pass"})

    def test_results_stream_before_the_file_ends(self):
        # The first test's line must reach the reader while the second test
        # still runs: it waits for a file the reader creates on seeing it.
        self.write({
            "tests/test_s.py": """
                import os, time, unittest
                GO = os.path.join(os.path.dirname(__file__), os.pardir, "go")

                class T(unittest.TestCase):
                    def test_1(self):
                        pass

                    def test_2(self):
                        deadline = time.monotonic() + 30
                        while not os.path.exists(GO):
                            self.assertLess(time.monotonic(), deadline)
                            time.sleep(0.01)
            """,
        })
        process = subprocess.Popen(
            [PYTHON, "-c", LOADER, "tests/test_s.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=self.repo, env=sandbox_env(self.repo, self.tmpdir),
        )
        process.stdin.write(stdin_bytes())
        process.stdin.close()
        self.assertEqual(json.loads(process.stdout.readline())["driver"], 2)
        first = json.loads(process.stdout.readline())
        self.assertEqual((first["id"], first["outcome"]), ("tests.test_s.T.test_1", "pass"))
        (self.repo / "go").touch()
        rest = [json.loads(line) for line in process.stdout]
        process.stdout.close()
        self.assertEqual(process.wait(timeout=60), 0)
        self.assertEqual(rest[0]["id"], "tests.test_s.T.test_2")
        self.assertEqual(rest[0]["outcome"], "pass")


def crash_file(body, setup=""):
    """A test file whose test_2 runs `body`; test_1 and test_3 pass."""
    return (
        "import ctypes, os, signal, sys, time, unittest\n%s\n"
        "class T(unittest.TestCase):\n"
        "    def test_1(self):\n        pass\n"
        "    def test_2(self):\n        print('last words of test_2', flush=True)\n%s\n"
        "    def test_3(self):\n        pass\n"
    ) % (setup, textwrap.indent(textwrap.dedent(body), " " * 8))


class Crashes(DriverTest):
    def crash(self, body, *phrases, options=(), setup=""):
        self.write({"tests/test_c.py": crash_file(body, setup), "tests/test_ok.py": crash_file("pass")})
        run = self.run_driver(*options, "tests/test_c.py", "tests/test_ok.py")
        p = "tests.test_c.T."
        self.assertEqual(run.outcomes("tests/test_c.py"), {p + "test_1": "pass", p + "test_2": "error", p + "test_3": "pass"})
        q = "tests.test_ok.T."
        self.assertEqual(run.outcomes("tests/test_ok.py"), {q + "test_1": "pass", q + "test_2": "pass", q + "test_3": "pass"})
        result = run.of("tests/test_c.py")[p + "test_2"]
        self.assertCrash(result, *phrases)
        return result

    def test_os_exit(self):
        result = self.crash(
            "os._exit(0)",
            "the test process exited before the test driver finished (a test may have called os._exit) "
            "while running tests.test_c.T.test_2.",
        )
        self.assertIn("last words of test_2", result["message"])

    def test_exit_code(self):
        self.crash("os._exit(3)", "the test process exited with code 3 while running tests.test_c.T.test_2.")

    def test_segfault_in_c_code(self):
        result = self.crash(
            "ctypes.string_at(0)",
            "the test process was killed by signal SIGSEGV (a crash in C code, or the out-of-memory killer) "
            "while running tests.test_c.T.test_2.",
            "Fatal Python error: Segmentation fault",
            "in test_2",
        )
        # Tracebacks name the driver's file as the bootstrap compiled it.
        self.assertIn('File "kiln-driver.py"', result["message"])
        self.assertLess(len(result["message"]), 4600)

    def test_sigsegv_sent_to_itself(self):
        self.crash("os.kill(os.getpid(), signal.SIGSEGV)", "killed by signal SIGSEGV", "while running tests.test_c.T.test_2.")

    def test_sigkill(self):
        self.crash("os.kill(os.getpid(), signal.SIGKILL)", "killed by signal SIGKILL", "while running tests.test_c.T.test_2.")

    def test_hang_with_timeout(self):
        self.crash(
            "time.sleep(600)",
            "the test process was killed after 1.",
            "because it ran out of time while running tests.test_c.T.test_2.",
            options=("--timeout", "1", "--slots", "2"),
        )

    def test_hang_ignoring_sigterm_and_sigint(self):
        self.crash(
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(600)",
            "ran out of time while running tests.test_c.T.test_2.",
            options=("--timeout", "1"),
        )

    def test_keyboard_interrupt(self):
        # As under plain unittest, KeyboardInterrupt ends the run (of this
        # file): the test gets no outcome, and the child's end is the
        # module's error.
        self.write({"tests/test_c.py": crash_file("os.kill(os.getpid(), signal.SIGINT)"), "tests/test_ok.py": crash_file("pass")})
        run = self.run_driver("tests/test_c.py", "tests/test_ok.py")
        p = "tests.test_c.T."
        self.assertEqual(run.outcomes("tests/test_c.py"), {p + "test_1": "pass", p + "test_2": "error", "tests.test_c": "error"})
        self.assertEqual(run.of("tests/test_c.py")[p + "test_2"]["message"], "unittest reported no outcome for this test")
        self.assertCrash(run.of("tests/test_c.py")["tests.test_c"],
                         "the test process exited with code 1 after 2 results; any remaining tests did not run.",
                         "KeyboardInterrupt")
        self.assertEqual(len(run.outcomes("tests/test_ok.py")), 3)

    def test_closing_every_descriptor(self):
        # The results pipe and the output file go too: the child cannot go
        # on, and says why.
        self.crash("os.closerange(3, 4096)", "while running tests.test_c.T.test_2.")

    def test_crash_outside_a_test_blames_the_module(self):
        self.write({
            "tests/test_c.py": """
                import os, unittest

                class A(unittest.TestCase):
                    def test_a(self):
                        pass

                class B(unittest.TestCase):
                    @classmethod
                    def setUpClass(cls):
                        os._exit(5)

                    def test_b(self):
                        pass
            """,
        })
        run = self.run_driver("tests/test_c.py")
        self.assertEqual(run.outcomes("tests/test_c.py"), {"tests.test_c.A.test_a": "pass", "tests.test_c": "error"})
        self.assertCrash(run.of("tests/test_c.py")["tests.test_c"],
                         "the test process exited with code 5 after 1 results; any remaining tests did not run.")

    def test_crash_at_import(self):
        self.write({"tests/test_c.py": "import os\nprint('importing', flush=True)\nos._exit(0)\n"})
        run = self.run_driver("tests/test_c.py")
        self.assertEqual(run.outcomes("tests/test_c.py"), {"tests.test_c": "error"})
        self.assertCrash(run.of("tests/test_c.py")["tests.test_c"], "exited before the test driver finished", "importing")

    def test_several_crashes_in_one_file(self):
        methods = "".join(
            "    def test_%02d(self):\n        %s\n" % (i, "os._exit(1)" if i % 2 else "pass") for i in range(10)
        )
        self.write({"tests/test_c.py": "import os, unittest\nclass T(unittest.TestCase):\n" + methods})
        run = self.run_driver("tests/test_c.py")
        self.assertEqual(
            run.outcomes("tests/test_c.py"),
            {"tests.test_c.T.test_%02d" % i: "error" if i % 2 else "pass" for i in range(10)},
        )

    def test_restarts_stop_after_the_limit(self):
        methods = "".join("    def test_%03d(self):\n        os._exit(1)\n" % i for i in range(103))
        self.write({"tests/test_c.py": "import os, unittest\nclass T(unittest.TestCase):\n" + methods})
        run = self.run_driver("tests/test_c.py")
        outcomes = run.outcomes("tests/test_c.py")
        # The first run and 100 restarts: 101 tests, the rest never ran.
        self.assertEqual(outcomes, {"tests.test_c.T.test_%03d" % i: "error" for i in range(101)})
        last = run.of("tests/test_c.py")["tests.test_c.T.test_100"]["message"]
        self.assertIn("The file's remaining tests were not run: the file was restarted 100 times already.", last)

    def test_a_left_out_test_that_runs_again_stops_the_file(self):
        # load_tests hides the crashing test in a wrapper whose own id is
        # not the test's, so leaving the test out cannot work.
        self.write({
            "tests/test_c.py": """
                import os, unittest

                class T(unittest.TestCase):
                    def test_crash(self):
                        os._exit(1)

                class Wrapper:
                    def __init__(self, test):
                        self.test = test

                    def id(self):
                        return "wrapper"

                    def __call__(self, result):
                        return self.test(result)

                def load_tests(loader, tests, pattern):
                    suite = unittest.TestSuite()
                    suite.addTest(Wrapper(T("test_crash")))
                    return suite
            """,
        })
        run = self.run_driver("tests/test_c.py")
        # The second crash is the module's: the test has its result.
        self.assertEqual(run.outcomes("tests/test_c.py"), {"tests.test_c.T.test_crash": "error", "tests.test_c": "error"})
        self.assertCrash(
            run.of("tests/test_c.py")["tests.test_c"],
            "the test process exited with code 1 while running tests.test_c.T.test_crash.",
            "The file's remaining tests were not run: tests.test_c.T.test_crash ran again although it was left out.",
        )

    def test_a_fixture_failing_again_after_a_restart_is_reported_once(self):
        self.write({
            "tests/test_c.py": """
                import os, unittest

                class A(unittest.TestCase):
                    @classmethod
                    def setUpClass(cls):
                        raise RuntimeError("no A today")

                    def test_a(self):
                        pass

                class B(unittest.TestCase):
                    def test_b1(self):
                        os._exit(1)

                    def test_b2(self):
                        pass
            """,
        })
        run = self.run_driver("tests/test_c.py")
        self.assertEqual(
            run.outcomes("tests/test_c.py"),
            {"setUpClass (tests.test_c.A)": "error", "tests.test_c.B.test_b1": "error", "tests.test_c.B.test_b2": "pass"},
        )


class Hostile(DriverTest):
    """Tests that misbehave: each gets a bounded, clear result, and the
    other tests and files theirs."""

    def hostile(self, body, outcome="pass", options=(), neighbours=True):
        files = {"tests/test_h.py": crash_file(body)}
        if neighbours:
            files["tests/test_ok.py"] = crash_file("pass")
        self.write(files)
        run = self.run_driver(*options, *(["tests/test_h.py", "tests/test_ok.py"] if neighbours else ["tests/test_h.py"]))
        p = "tests.test_h.T."
        self.assertEqual(run.outcomes("tests/test_h.py"), {p + "test_1": "pass", p + "test_2": outcome, p + "test_3": "pass"},
                         run.describe())
        if neighbours:
            q = "tests.test_ok.T."
            self.assertEqual(run.outcomes("tests/test_ok.py"),
                             {q + "test_1": "pass", q + "test_2": "pass", q + "test_3": "pass"})
        return run, run.of("tests/test_h.py")[p + "test_2"]

    def test_reading_stdin_gets_eof(self):
        self.hostile("assert sys.stdin.read() == ''\nassert os.read(0, 100) == b''")

    def test_printing_100_mb_is_cut_short(self):
        run, result = self.hostile(
            "chunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\nsys.stdout.flush()",
            outcome="error",
        )
        self.assertIn("File too large", result["message"])
        self.assertLess(len(result["message"]), 30000)

    def test_writing_to_descriptors_1_and_2(self):
        run, _ = self.hostile("os.write(1, b'{\"done\": true}\\nnot json\\n')\nos.write(2, b'to stderr\\n')\nself.fail('see output')",
                              outcome="fail")
        message = run.of("tests/test_h.py")["tests.test_h.T.test_2"]["message"]
        self.assertIn('{"done": true}\nnot json\nto stderr', message)

    def test_closing_stdout_and_stderr(self):
        self.hostile("sys.stdout.flush()\nos.close(1)\nos.close(2)")

    def test_chdir(self):
        self.hostile("os.chdir('/')")

    def test_fork_that_carries_on(self):
        # The forked copy runs the rest of the file too, but says nothing;
        # and a grandchild holding the pipe open does not keep the file
        # from ending: its process group is killed.
        self.hostile("if os.fork() == 0:\n    time.sleep(0.2)")
        self.hostile("if os.fork() == 0:\n    time.sleep(600)", neighbours=False)

    def test_signal_handlers(self):
        self.hostile("signal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "signal.signal(signal.SIGCHLD, signal.SIG_IGN)")

    def test_deleting_modules(self):
        self.hostile("del sys.modules['unittest']\ndel sys.modules['json']\ndel sys.modules['os']")

    def test_sys_exit_in_a_test(self):
        self.hostile("sys.exit(4)", outcome="error")

    def test_sys_exit_at_import(self):
        self.write({"tests/test_h.py": "import sys\nsys.exit(1)\n", "tests/test_ok.py": crash_file("pass")})
        run = self.run_driver("tests/test_h.py", "tests/test_ok.py")
        self.assertEqual(run.outcomes("tests/test_h.py"), {"tests.test_h": "error"})
        self.assertIn("SystemExit", run.of("tests/test_h.py")["tests.test_h"]["message"])
        self.assertEqual(len(run.outcomes("tests/test_ok.py")), 3)

    def test_sys_exit_escaping_from_set_up_class(self):
        # unittest does not catch SystemExit from setUpClass: the child ends
        # with that code, like the interpreter would.
        self.write({"tests/test_h.py": """
            import sys, unittest

            class T(unittest.TestCase):
                @classmethod
                def setUpClass(cls):
                    sys.exit(7)

                def test(self):
                    pass
        """})
        run = self.run_driver("tests/test_h.py")
        self.assertEqual(run.outcomes("tests/test_h.py"), {"tests.test_h": "error"})
        self.assertIn("the test process exited with code 7.", run.of("tests/test_h.py")["tests.test_h"]["message"])


class Isolation(DriverTest):
    def test_each_file_imports_its_modules_afresh(self):
        self.write({
            "tests/shared.py": "VALUE = None\n",
            "tests/test_a.py": """
                import unittest
                from tests import shared
                import json

                class T(unittest.TestCase):
                    def test_set(self):
                        shared.VALUE = "set by a"
                        json.kiln_mark = True
            """,
            "tests/test_b.py": """
                import json, sys, unittest
                from tests import shared

                class T(unittest.TestCase):
                    def test_unset(self):
                        self.assertIsNone(shared.VALUE)
                        self.assertFalse(hasattr(json, "kiln_mark"))
                        self.assertNotIn("tests.test_a", sys.modules)
            """,
        })
        run = self.run_driver("tests/test_a.py", "tests/test_b.py")
        self.assertEqual(run.outcomes("tests/test_b.py"), {"tests.test_b.T.test_unset": "pass"})

    def test_the_process_looks_like_python_m_unittest(self):
        self.write({"tests/test_a.py": """
            import os, sys, unittest

            class T(unittest.TestCase):
                def test_argv_and_path(self):
                    self.assertEqual(sys.argv[1:], ["discover", "-s", "tests", "-t", "."])
                    self.assertTrue(sys.argv[0].endswith(" -m unittest"))
                    self.assertEqual(sys.path[0], os.getcwd())
                    self.assertNotIn(os.path.join(os.getcwd(), "src"), sys.path)
                    self.assertEqual(os.getpgid(0), os.getpid())
        """})
        run = self.run_driver("tests/test_a.py")
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_argv_and_path": "pass"}, run.describe())


SRC_TEST = """
    import os, sys, unittest

    class T(unittest.TestCase):
        def test_import(self):
            import %s
            self.assertEqual(sys.path[1], os.path.join(os.getcwd(), "src"))
"""


class SrcLayout(DriverTest):
    def test_a_package_under_src(self):
        self.write({"src/pkg/__init__.py": "", "tests/test_a.py": SRC_TEST % "pkg"})
        run = self.run_driver("tests/test_a.py")
        self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_import": "pass"}, run.describe())

    def test_a_namespace_package_declared_in_pyproject(self):
        for config, text in [
            ("pyproject.toml", "[tool.setuptools.packages.find]\nwhere = ['src']\n"),
            ("pyproject.toml", '[tool.setuptools]\npackage-dir = {"" = "src"}\n'),
            ("pyproject.toml", '[tool.hatch.build.targets.wheel]\npackages = ["src/ns"]\n'),
            ("setup.cfg", "[options]\npackage_dir =\n    = src\n"),
        ]:
            with self.subTest(config=config, text=text):
                self.setUp()
                self.write({config: text, "src/ns/mod.py": "", "tests/test_a.py": SRC_TEST % "ns.mod"})
                run = self.run_driver("tests/test_a.py")
                self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_import": "pass"}, run.describe())

    def test_not_a_src_layout(self):
        # The root holds the package too (src/ is something else), or src/
        # holds no package.
        for files in ({"pkg/__init__.py": "", "src/pkg/__init__.py": ""}, {"src/data.txt": ""}):
            with self.subTest(files=files):
                self.setUp()
                self.write(dict(files, **{"tests/test_a.py": """
                    import os, sys, unittest

                    class T(unittest.TestCase):
                        def test_path(self):
                            self.assertNotIn(os.path.join(os.getcwd(), "src"), sys.path)
                """}))
                run = self.run_driver("tests/test_a.py")
                self.assertEqual(run.outcomes("tests/test_a.py"), {"tests.test_a.T.test_path": "pass"})


class Bootstrap(unittest.TestCase):
    def test_the_driver_fits_in_the_literal(self):
        self.assertNotIn(b"'''", DRIVER)
        self.assertTrue(DRIVER.endswith(b"\n"))
        DRIVER.decode("ascii")
        BOOTSTRAP.decode("ascii")

    def test_old_interpreters_get_the_too_old_line(self):
        found = 0
        for version in ("2.7.18", "3.6.15", "3.7.16"):
            python = PYENV / version / "bin" / "python"
            if not python.exists():
                continue
            found += 1
            with self.subTest(version=version):
                done = subprocess.run([str(python), "-c", LOADER, "tests/test_x.py"], input=stdin_bytes(), capture_output=True,
                                      timeout=60)
                self.assertEqual((done.returncode, done.stdout), (3, b'{"too-old": "%s"}\n' % version.encode()), done.stderr)
        if not found:
            self.skipTest("no Python 2.7, 3.6 or 3.7 under %s" % PYENV)

    def test_the_driver_also_runs_on_its_own(self):
        # `python3 - FILE < driver.py`, without the guard, for debugging.
        with tempfile.TemporaryDirectory() as repo:
            done = subprocess.run([PYTHON, "-"], input=DRIVER, cwd=repo, capture_output=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.decode().splitlines()[-1], '{"done": true}')


def _pids_cgroup():
    """A fresh pids cgroup directory (v1 or v2) or None."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        try:
            if base == Path("/sys/fs/cgroup") and "pids" not in (base / "cgroup.subtree_control").read_text():
                continue
            path = base / ("kiln-driver-test-%d-%d" % (os.getpid(), time.monotonic_ns()))
            path.mkdir()
            return path
        except OSError:
            continue
    return None


class ProcessLimit(DriverTest):
    """Under a pids cgroup and a PID namespace whose init is the driver, as
    in Kiln's sandbox."""

    def limited(self, pids_max, *args):
        if os.geteuid() != 0 or not shutil.which("unshare"):
            self.skipTest("needs root and unshare(1) for a pids cgroup and a PID namespace")
        cgroup = _pids_cgroup()
        if cgroup is None:
            self.skipTest("no pids cgroup can be created here")

        def remove():
            for _ in range(100):
                procs = (cgroup / "cgroup.procs").read_text().split()
                for pid in procs:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    cgroup.rmdir()
                    return
                except OSError:
                    time.sleep(0.05)

        self.addCleanup(remove)
        (cgroup / "pids.max").write_text(str(pids_max))
        procs = str(cgroup / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return self.run_driver(*args, wrap=("unshare", "--pid", "--fork", "--kill-child"), preexec_fn=enter)

    def test_a_fork_bomb_costs_its_test_only(self):
        self.write({
            "tests/test_bomb.py": crash_file("while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
            "tests/test_ok.py": crash_file("pass"),
            "tests/test_ok2.py": crash_file("pass"),
        })
        run = self.limited(64, "--slots", "2", "--timeout", "3", "tests/test_bomb.py", "tests/test_ok.py", "tests/test_ok2.py")
        p = "tests.test_bomb.T."
        self.assertEqual(run.outcomes("tests/test_bomb.py"), {p + "test_1": "pass", p + "test_2": "error", p + "test_3": "pass"},
                         run.describe())
        self.assertIn("ran out of time while running tests.test_bomb.T.test_2.", run.of("tests/test_bomb.py")[p + "test_2"]["message"])
        for name in ("test_ok", "test_ok2"):
            self.assertEqual(set(run.outcomes("tests/%s.py" % name).values()), {"pass"}, run.describe())
            self.assertEqual(len(run.outcomes("tests/%s.py" % name)), 3)

    def test_a_file_that_cannot_be_forked_is_an_error(self):
        self.write({"tests/test_ok.py": crash_file("pass")})
        # unshare and the driver: no room for a child.
        run = self.limited(2, "tests/test_ok.py")
        self.assertEqual(run.outcomes("tests/test_ok.py"), {"tests.test_ok": "error"})
        self.assertIn("the test driver could not start a process for this file (6 attempts)",
                      run.of("tests/test_ok.py")["tests.test_ok"]["message"])


def _load_compare():
    spec = importlib.util.spec_from_file_location("kiln_fidelity_compare", PLUGIN / "fidelity" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Fidelity(DriverTest):
    """The driver's outcomes equal plain unittest discover's, with the
    recorder fidelity/compare.py uses on real projects."""

    def test_same_outcomes_as_unittest_discover(self):
        self.write({
            "tests/test_mixed.py": MIXED,
            "tests/test_fixture.py": """
                import unittest

                class Broken(unittest.TestCase):
                    @classmethod
                    def setUpClass(cls):
                        raise RuntimeError("no")

                    def test_never(self):
                        pass

                class Fine(unittest.TestCase):
                    def test_ok(self):
                        pass

                def tearDownModule():
                    raise RuntimeError("module teardown")
            """,
            "tests/test_broken.py": "import no_such_module\n",
            "tests/test_skipped.py": "import unittest\nraise unittest.SkipTest('module skipped')\n",
            "tests/test_lt.py": """
                import unittest

                class T(unittest.TestCase):
                    def test_a(self):
                        pass

                    def test_b(self):
                        self.fail("b")

                def load_tests(loader, tests, pattern):
                    suite = unittest.TestSuite()
                    suite.addTest(T("test_b"))
                    return suite
            """,
            "tests/pkg/__init__.py": """
                import os, unittest

                def load_tests(loader, tests, pattern):
                    return loader.discover(os.path.dirname(__file__), pattern="check_*.py")
            """,
            "tests/pkg/check_x.py": "import unittest\nclass C(unittest.TestCase):\n    def test_c(self): pass\n",
            "tests/pkg/test_hidden.py": "import unittest\nclass H(unittest.TestCase):\n    def test_h(self): pass\n",
            "tests/sub/__init__.py": "",
            "tests/sub/test_deep.py": "import unittest\nclass D(unittest.TestCase):\n    def test_d(self): pass\n",
        })
        files = sorted(
            str(path.relative_to(self.repo)) for path in (self.repo / "tests").rglob("*.py")
            if path.name.startswith("test") or path.name == "__init__.py"
        )
        run = self.run_driver("--slots", "2", *files)
        driver = {}
        for result in run.results:
            driver.setdefault(result["id"], result["outcome"])

        recorder = _load_compare().RECORDER
        with tempfile.TemporaryDirectory() as scratch:
            output = os.path.join(scratch, "results.json")
            subprocess.run([PYTHON, "-c", recorder, output], cwd=self.repo, env=sandbox_env(self.repo, self.tmpdir),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
            with open(output) as f:
                plain = {i: outcome for i, (outcome, _) in json.load(f)["results"].items()}
        self.assertEqual(driver, plain)
        # And the comparison saw every kind of outcome.
        self.assertEqual(set(plain.values()), {"pass", "fail", "error", "skip", "xfail", "xpass"})
        self.assertIn("tests.pkg.check_x.C.test_c", plain)
        self.assertIn("tearDownModule (tests.test_fixture)", plain)


if __name__ == "__main__":
    unittest.main()
