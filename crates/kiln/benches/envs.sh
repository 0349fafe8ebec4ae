#!/usr/bin/env bash
# Benchmark (issue 11): commit -> final for a project with five test
# dependencies, with its environment built (cold) and reused (warm), side by
# side with `python3 -m venv && pip install -r ... && python -m unittest
# discover` by hand. Needs pypi.org. Usage: KILN=target/release/kiln crates/kiln/benches/envs.sh
set -euo pipefail
KILN=$(realpath "${KILN:-target/debug/kiln}")
D=$(mktemp -d /tmp/kbench.XXXX)
cd "$D"
$KILN certs init --dir certs --san 127.0.0.1 >/dev/null
for r in "runner r1" "observer o1" "admin a1"; do $KILN certs issue $r --dir certs >/dev/null; done
PORT=$((20000 + RANDOM % 20000))
$KILN dispatcher --identity certs/dispatcher --listen 127.0.0.1:$PORT --state state 2>dispatcher.log &
DP=$!
mkdir repo && cd repo && git init -q -b main && git config user.email b@x && git config user.name b
printf 'iniconfig==2.1.0\npackaging==25.0\npluggy==1.6.0\ntomli==2.2.1\nsix==1.17.0\n' > requirements-test.txt
printf '[python]\nrequirements = ["requirements-test.txt"]\n' > kiln.toml
mkdir tests && : > tests/__init__.py
for i in 1 2 3 4 5; do
  printf 'import unittest\nimport iniconfig, packaging.version, pluggy, tomli, six\n\n\nclass T(unittest.TestCase):\n    def test_%s(self):\n        self.assertTrue(packaging.version.Version("1.%s") > packaging.version.Version("1.0"))\n' $i $i > tests/test_m$i.py
done
git add -A && git commit -qm cold
cd ..
$KILN runner --identity certs/r1 --dispatcher 127.0.0.1:$PORT --work work --index-url https://pypi.org/simple 2>runner.log &
RP=$!
# The runner compiles its plugins at start-up: measure from a registered runner.
for _ in $(seq 600); do grep -q registered runner.log && break; sleep 0.1; done
$KILN observer --identity certs/o1 --dispatcher 127.0.0.1:$PORT --repo repo --interval 100ms 2>observer.log &
OP=$!
wait_final() { $KILN results "$1" --identity certs/a1 --dispatcher 127.0.0.1:$PORT --format json --wait 120s > "$2" || true; python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['status'], r['finished_at_ms']-r['queued_at_ms'], 'ms')" "$2"; }
C1=$(git -C repo rev-parse HEAD)
echo -n "kiln cold (env built):  "; wait_final $C1 cold.json
echo "# second" >> repo/tests/test_m1.py && git -C repo commit -qam warm
C2=$(git -C repo rev-parse HEAD)
echo -n "kiln warm (env reused): "; wait_final $C2 warm.json
grep -o 'environment [a-z]*.*elapsed_ms=[0-9]*' runner.log | sed 's/\x1b\[[0-9;]*m//g'
kill $OP $RP $DP; wait 2>/dev/null || true
cd repo
S=$(date +%s%N); python3 -m venv "$D/v" && "$D/v/bin/pip" install -q --disable-pip-version-check -r requirements-test.txt && "$D/v/bin/python" -m unittest discover -s tests -t . 2>/dev/null; E=$(date +%s%N)
echo "by hand: python3 -m venv + pip install -r (pip cache as found) + unittest discover: $(( (E-S)/1000000 )) ms"
S=$(date +%s%N); "$D/v/bin/python" -m unittest discover -s tests -t . 2>/dev/null; E=$(date +%s%N)
echo "by hand: unittest discover alone, in that venv: $(( (E-S)/1000000 )) ms"
rm -rf "$D"
