"""Compares Kiln's per-test outcomes with plain unittest's on a project.

Kiln's python-unittest plugin promises the outcomes that

    python3 -m unittest discover -s tests -t .

reports when run from a repository's root. This script checks that promise
on a real project: it runs (a) plain unittest discovery with a recording
result class and (b) `kiln plugin run --dir DIR --format json`, and prints
every difference and a summary line. FIDELITY.md (next to this file) records
its figures for real projects from PyPI.

    compare.py DIR                      a project already on disk
    compare.py --pypi NAME==VERSION     an sdist from PyPI, in a temporary directory
        [--deps PKG...]                 installed first into a throwaway venv
        [--install-project]             the project itself too (src/ layouts)
    compare.py --preset NAME            a project recorded in FIDELITY.md
    compare.py --all-presets            all of them; exit 0 only if each is equal, or
                                        differs exactly as FIDELITY.md documents
    compare.py --unittest-only DIR      print unittest's outcomes as JSON, or with --tsv
                                        one `outcome TAB id TAB skip reason` line each
                                        (tabs, newlines, backslashes escaped), for tests

Options: --kiln PATH (default: target/release/kiln or target/debug/kiln of
this repository, else `kiln` on PATH), --python PATH (the interpreter both
sides use, e.g. /root/.pyenv/versions/3.8.18/bin/python3; Kiln resolves
`python3` on PATH as a runner does, so the directory of PATH, which must hold
a `python3` that is that interpreter, goes first on kiln's PATH; default
python3, or the venv's, which is made from --python), --keep (keep the
temporary directory), --show N (differences listed per kind, default 50).

src/ layouts. The driver puts `src` on sys.path (right after the working
directory) when a repository has a src layout, so that a project's tests
import its package without installing it, which plain unittest cannot do
(cachetools: one import error instead of 476 tests). That difference is
deliberate: for such a project (the driver's own `_src_layout` decides),
unittest's side runs with PYTHONPATH=src, which puts `src` at the same place
on sys.path, and the summary also says what unittest gives without it.

How unittest's side is run. The recording program runs unittest's own
`__main__` (runpy, exactly what `python -m unittest` runs: unittest.main,
TextTestRunner, its warnings filter) with `discover -s tests -t .` and
sys.path[0] set as `-m` sets it; the only change is the runner's result
class, a TextTestResult subclass that also records each outcome and writes
them to a file.

How outcomes are named, on both sides (the driver, driver.py, reports the
same way):
  - a test: `test.id()`, e.g. `tests.test_x.T.test_m`; pass, fail, error,
    skip, xfail (expected failure) or xpass (unexpected success); when a test
    reports more than one outcome (a failure, then an error in tearDown) the
    worst counts: error > fail > xpass > xfail > skip > pass;
  - a failing subtest: its own id, `tests.test_x.T.test_m (i=1)`, fail or
    error; a test whose subtest failed gets no outcome of its own (unittest
    calls neither addSuccess nor addFailure for it), and passing subtests
    are not listed;
  - a failing class or module fixture: unittest's _ErrorHolder description,
    `setUpClass (tests.test_x.T)`, `tearDownModule (tests.test_x)`;
  - a module or package that could not be imported or loaded: unittest's
    `unittest.loader._FailedTest.tests.test_x` is named `tests.test_x`; one
    skipped on import, `unittest.loader.ModuleSkipped.tests.test_x`, too;
  - an id reported twice (a test class imported into a second module runs
    twice under discover): the first result counts, as in Kiln, where the
    runner keeps the first result for an id.
Skip reasons are compared too; tracebacks and durations are not.

The environment. Kiln runs each test command with a cleared environment
(PATH=/usr/local/bin:/usr/bin:/bin, LANG=C.UTF-8, PYTHONDONTWRITEBYTECODE=1,
PYTHONIOENCODING=utf-8, HOME set to the checkout, a private TMPDIR), so
unittest's side gets the same one here (with a venv's bin first on PATH),
and differences come from the plugin, not from the environment.

Python 3.11, standard library only. Third-party code is downloaded at run
time into a temporary directory, never into this repository.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DRIVER = REPO / "plugins" / "python-unittest" / "src" / "driver.py"

OUTCOMES = ["pass", "fail", "error", "skip", "xfail", "xpass"]


class Preset:
    """A real project whose comparison FIDELITY.md records."""

    def __init__(self, requirement, deps=(), install_project=False, note="", known=()):
        self.requirement = requirement
        self.deps = list(deps)
        self.install_project = install_project
        self.note = note
        # Ids whose outcomes differ by design (FIDELITY.md says why).
        self.known = set(known)


PRESETS = {
    "markdown": Preset("markdown==3.11.3", note="nested packages, load_tests in a module, many skips"),
    "pyasn1": Preset("pyasn1==0.6.5", note="nested packages (tests/codec/ber/...), shared base classes"),
    "more-itertools": Preset("more-itertools==11.2.1", note="load_tests adding doctests"),
    "idna": Preset("idna==3.20", deps=["hypothesis"], note="6,000+ tests, a test dependency"),
    "pyparsing": Preset("pyparsing==3.3.3", note="unittest suites plus skips and import errors for optional extras"),
    "pyasn1-modules": Preset("pyasn1-modules==0.4.2", note="a test module per RFC"),
    "semantic-version": Preset("semantic-version==2.10.0", note="Django tests skipped when Django is missing"),
    "unidecode": Preset("unidecode==1.4.0", note="a small flat suite"),
    "num2words": Preset(
        "num2words==0.5.14",
        note="NOT equal, by design: one test passes under discover only because an earlier module's tests "
        "changed the global decimal precision",
        known=["tests.test_bn.Num2WordsBNTest.test_parse_number"],
    ),
    "cachetools": Preset(
        "cachetools==8.0.2",
        note="src/ layout, not installed: the driver puts src on sys.path (plain unittest cannot import the "
        "package, so tests/__init__.py fails); compared with unittest under PYTHONPATH=src",
    ),
    "cachetools-installed": Preset(
        "cachetools==8.0.2", install_project=True, note="src/ layout, installed into the venv; mixins in tests/__init__.py"
    ),
}

# The environment Kiln's command sandbox gives a test command
# (crates/kiln-sandbox/src/command.rs), besides HOME and TMPDIR.
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_ENV = {"LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}

# Run by the interpreter under test, in the project's root: plain unittest
# discovery, recording each outcome. argv: OUTPUT_FILE.
RECORDER = r'''
import json, os, runpy, sys, unittest, unittest.runner

OUTPUT = sys.argv[1]
SEVERITY = ["pass", "skip", "xfail", "xpass", "fail", "error"]
PLACEHOLDERS = ("unittest.loader._FailedTest.", "unittest.loader.ModuleSkipped.")
RESULTS = {}     # id -> [outcome, skip reason]
REPEATED = {}    # id -> outcomes of later reports of an id already recorded


def name(test):
    raw = test.id()
    for prefix in PLACEHOLDERS:
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


def keep(tid, outcome, reason):
    if tid in RESULTS:
        REPEATED.setdefault(tid, []).append(outcome)
    else:
        RESULTS[tid] = [outcome, reason]


class Recorder(unittest.TextTestResult):
    def startTest(self, test):
        super().startTest(test)
        self._kiln_current = test
        self._kiln_own = []

    def stopTest(self, test):
        super().stopTest(test)
        if self._kiln_own:
            outcome = max((o for o, _ in self._kiln_own), key=SEVERITY.index)
            reason = "\n".join(r for o, r in self._kiln_own if o == "skip")
            keep(name(test), outcome, reason if outcome == "skip" else "")
        self._kiln_current = None

    def _kiln(self, test, outcome, reason=""):
        if test is getattr(self, "_kiln_current", None):
            self._kiln_own.append((outcome, reason))
        else:
            keep(name(test), outcome, reason)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._kiln(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._kiln(test, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        self._kiln(test, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._kiln(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._kiln(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._kiln(test, "xpass")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._kiln(subtest, "fail" if issubclass(err[0], test.failureException) else "error")


unittest.runner.TextTestRunner.resultclass = Recorder
# What `python -m unittest discover -s tests -t .` sees: runpy sets argv[0]
# to unittest's __main__.py, which renames it "python3 -m unittest", and `-m`
# puts the absolute working directory first on sys.path.
sys.argv = [sys.argv[0], "discover", "-s", "tests", "-t", "."]
if sys.path and sys.path[0] == "":
    sys.path[0] = os.getcwd()
try:
    runpy.run_module("unittest", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    with open(OUTPUT, "w", encoding="utf-8") as f:
        json.dump({"results": RESULTS, "repeated": REPEATED}, f)
'''


def sandbox_env(project, tmpdir, venv_bin=None, src=None):
    """The environment Kiln gives a test command in `project`, with
    PYTHONPATH=`src` when given."""
    path = SANDBOX_PATH if venv_bin is None else f"{venv_bin}:{SANDBOX_PATH}"
    env = {**SANDBOX_ENV, "PATH": path, "HOME": str(project), "TMPDIR": str(tmpdir)}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def src_layout(project):
    """The `src` directory the driver puts on sys.path for `project`, or
    None: the driver's own `_src_layout`, loaded from driver.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kiln_unittest_driver", DRIVER)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver._src_layout(str(project))


def run_unittest(project, python, venv_bin=None, src=None):
    """unittest's outcomes for `project` (with PYTHONPATH=`src` when given):
    ({id: [outcome, reason]}, {id: [later outcomes]})."""
    with tempfile.TemporaryDirectory(prefix="kiln-fidelity-unittest-") as scratch:
        output = Path(scratch, "results.json")
        tmpdir = Path(scratch, "tmp")
        tmpdir.mkdir()
        log = Path(scratch, "unittest.log")
        with open(log, "wb") as out:
            subprocess.run(
                [python, "-c", RECORDER, str(output)],
                cwd=project,
                env=sandbox_env(project, tmpdir, venv_bin, src),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if not output.exists():
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"plain unittest did not finish in {project}:\n{tail}")
        recorded = json.loads(output.read_text())
        return recorded["results"], recorded["repeated"]


def find_kiln(explicit):
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "kiln"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("kiln")
    if found:
        return found
    raise SystemExit("cannot find kiln: build it (cargo build -p kiln) or pass --kiln PATH")


def python_dir(python):
    """The directory to put first on kiln's PATH so that the plugin host,
    which resolves `python3` on PATH, runs `python`."""
    directory = Path(python).parent
    candidate = directory / "python3"
    if not candidate.exists() or candidate.resolve() != Path(python).resolve():
        raise SystemExit(f"--python {python}: kiln runs the `python3` on its PATH, and {candidate} is not this "
                         "interpreter; give the path of a python3 (e.g. /root/.pyenv/versions/3.8.18/bin/python3)")
    return directory


def run_kiln(project, kiln, venv_bin=None, python=None):
    """Kiln's outcomes for `project`: {id: [outcome, skip reason]}."""
    # The plugin host resolves `python3` on this PATH: a venv's, if any,
    # else the directory of --python, if given.
    path = os.environ.get("PATH", SANDBOX_PATH)
    first = venv_bin if venv_bin is not None else (python_dir(python) if python else None)
    env = {**os.environ, "PATH": path if first is None else f"{first}:{path}", "RUST_LOG": "warn"}
    done = subprocess.run(
        [kiln, "plugin", "run", "--dir", str(project), "--format", "json"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if done.returncode not in (0, 1):
        stderr = done.stderr.decode(errors="replace")[-3000:]
        raise SystemExit(f"kiln plugin run failed (exit {done.returncode}) in {project}:\n{stderr}")
    report = json.loads(done.stdout)
    return {t["id"]: [t["outcome"], t["message"] if t["outcome"] == "skip" else ""] for t in report["tests"]}


def counts(results):
    c = {o: 0 for o in OUTCOMES}
    for outcome, _ in results.values():
        c[outcome] += 1
    return c


def describe(c):
    return ", ".join(f"{o} {c[o]}" for o in OUTCOMES)


def compare(label, unittest_results, kiln_results, show, known=frozenset()):
    """Prints the differences and a summary line; returns the ids that
    differ (empty when equal). `known` differences are expected, and said so."""
    only_unittest = sorted(set(unittest_results) - set(kiln_results))
    only_kiln = sorted(set(kiln_results) - set(unittest_results))
    different = sorted(
        i for i in set(unittest_results) & set(kiln_results) if unittest_results[i] != kiln_results[i]
    )
    for title, ids, line in [
        ("only in unittest", only_unittest, lambda i: f"{i} ({unittest_results[i][0]})"),
        ("only in kiln", only_kiln, lambda i: f"{i} ({kiln_results[i][0]})"),
        ("different", different, lambda i: f"{i}: unittest {unittest_results[i]}, kiln {kiln_results[i]}"),
    ]:
        if ids:
            print(f"  {title}: {len(ids)}")
            for i in ids[:show]:
                print(f"    {line(i)}")
            if len(ids) > show:
                print(f"    ... and {len(ids) - show} more")
    differing = set(only_unittest) | set(only_kiln) | set(different)
    verdict = "yes" if not differing else "no"
    if differing and differing == set(known):
        verdict = "no (only the known differences FIDELITY.md explains)"
    print(
        f"{label}: unittest {len(unittest_results)} tests ({describe(counts(unittest_results))}); "
        f"kiln {len(kiln_results)} tests ({describe(counts(kiln_results))}); equal: {verdict}"
    )
    return differing


def compare_dir(project, python, kiln, show, label=None, venv_bin=None, known=frozenset(), explicit_python=None):
    project = Path(project).resolve()
    src = src_layout(project)
    if src is not None:
        plain, _ = run_unittest(project, python, venv_bin)
        print(f"  src layout: the driver puts {Path(src).relative_to(project)}/ on sys.path, so unittest's side "
              f"runs with PYTHONPATH=src; plain unittest without it: {len(plain)} tests ({describe(counts(plain))})")
    started = time.monotonic()
    unittest_results, repeated = run_unittest(project, python, venv_bin, src)
    unittest_seconds = time.monotonic() - started
    started = time.monotonic()
    kiln_results = run_kiln(project, kiln, venv_bin, explicit_python)
    kiln_seconds = time.monotonic() - started
    print(f"  wall time: unittest {unittest_seconds:.1f} s, kiln {kiln_seconds:.1f} s")
    inconsistent = {i: o for i, o in repeated.items() if any(x != unittest_results[i][0] for x in o)}
    if inconsistent:
        print(f"  note: {len(inconsistent)} ids reported more than once by unittest with different outcomes")
    return compare(label or str(project), unittest_results, kiln_results, show, known)


def unpack(archive, into):
    """Unpacks an sdist; returns its top-level directory."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")
    tops = [p for p in Path(into).iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise SystemExit(f"{archive.name} does not unpack into one directory")
    return tops[0]


def compare_pypi(requirement, deps, install_project, kiln, show, keep, python=None, known=frozenset()):
    work = Path(tempfile.mkdtemp(prefix="kiln-fidelity-"))
    try:
        download = work / "download"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", requirement,
             "-d", str(download)],
            check=True,
        )
        archives = list(download.iterdir())
        if len(archives) != 1:
            raise SystemExit(f"pip download {requirement} gave {len(archives)} files")
        project = unpack(archives[0], work / "src")
        venv_bin = None
        if deps or install_project:
            venv = work / "venv"
            subprocess.run([python or sys.executable, "-m", "venv", str(venv)], check=True)
            venv_bin = venv / "bin"
            packages = list(deps) + ([str(project)] if install_project else [])
            subprocess.run([str(venv_bin / "python"), "-m", "pip", "install", "--quiet", *packages], check=True)
            python = str(venv_bin / "python3")
            # A build can leave files in the project (build/, *.egg-info);
            # they are outside tests/ and change nothing either side runs.
        explicit_python = python if venv_bin is None else None
        python = python or default_python()
        label = requirement + (" (installed)" if install_project else "")
        return compare_dir(project, python, kiln, show, label=label, venv_bin=venv_bin, known=known,
                           explicit_python=explicit_python)
    finally:
        if keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def escape(text):
    """One line, no tabs: for --tsv."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def default_python():
    """The interpreter a runner allowed `python3` would use (its sys.executable)."""
    found = shutil.which("python3")
    if not found:
        raise SystemExit("python3 is not on PATH")
    return subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("dir", nargs="?", help="a project directory with tests/")
    what.add_argument("--pypi", metavar="NAME==VERSION", help="compare an sdist from PyPI")
    what.add_argument("--preset", choices=sorted(PRESETS), help="compare a project recorded in FIDELITY.md")
    what.add_argument("--all-presets", action="store_true", help="compare every preset")
    what.add_argument("--unittest-only", metavar="DIR", help="print plain unittest's outcomes for DIR as JSON")
    parser.add_argument("--deps", nargs="*", default=[], help="packages to install into a throwaway venv first")
    parser.add_argument("--install-project", action="store_true", help="install the project into the venv too")
    parser.add_argument("--kiln", help="the kiln binary")
    parser.add_argument("--python", help="the interpreter for both sides")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--show", type=int, default=50, help="differences listed per kind")
    parser.add_argument("--tsv", action="store_true", help="with --unittest-only: tab-separated lines, not JSON")
    args = parser.parse_args()

    if args.unittest_only:
        results, _ = run_unittest(Path(args.unittest_only).resolve(), args.python or default_python())
        if args.tsv:
            for test_id, (outcome, reason) in sorted(results.items()):
                print("\t".join([outcome, escape(test_id), escape(reason)]))
        else:
            json.dump(results, sys.stdout, indent=1, sort_keys=True)
            print()
        return 0
    kiln = find_kiln(args.kiln)
    if args.dir:
        python = args.python or default_python()
        return 1 if compare_dir(args.dir, python, kiln, args.show, explicit_python=args.python) else 0
    if args.pypi:
        differing = compare_pypi(args.pypi, args.deps, args.install_project, kiln, args.show, args.keep, args.python)
        return 1 if differing else 0
    # Presets pass when they differ exactly where FIDELITY.md says they do.
    names = sorted(PRESETS) if args.all_presets else [args.preset]
    as_documented = True
    for name in names:
        preset = PRESETS[name]
        differing = compare_pypi(preset.requirement, preset.deps, preset.install_project, kiln, args.show,
                                 args.keep, args.python, preset.known)
        as_documented = as_documented and differing == preset.known
    return 0 if as_documented else 1


if __name__ == "__main__":
    sys.exit(main())
