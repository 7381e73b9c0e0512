#!/usr/bin/env bash
# Check the package as users get it (`make package-check`; CI runs it after the tests):
#
#   1. build the sdist from a clean copy of the checkout and check what it holds, then the wheel
#      from the unpacked sdist (or take WHEEL, the first argument, and skip the sdist);
#   2. install it with packaging/install.sh (the Dockerfile's procedure) into a new virtualenv
#      in a temporary directory outside the checkout;
#   3. from a working directory outside the checkout: `twistd cloudhub --help`, the version
#      (`cloudhub --version`, `twistd cloudhub --version`), `cloudhub check-config` on a good and
#      a broken config; then a real hub: `twistd -n cloudhub --config FILE` on free loopback
#      ports, ready (GET /readyz) within READY_TIMEOUT seconds, then SIGTERM and exit status 0
#      within STOP_TIMEOUT seconds;
#   4. run tests.test_config, tests.test_wire_packer and tests.test_packaging from the unpacked
#      sdist.
#
# Every check runs; the failed ones are listed at the end and the exit status is 1. The hub is
# killed and the temporary directory removed however the script ends.
#
#   packaging/check-install.sh [WHEEL]
#   PYTHON=python3.12 packaging/check-install.sh      # another interpreter (default python3)
#   KEEP=1 packaging/check-install.sh                 # keep the temporary directory
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python3}
ready_timeout=${READY_TIMEOUT:-30}
stop_timeout=${STOP_TIMEOUT:-20}

work=$(mktemp -d "${TMPDIR:-/tmp}/cloudhub-package-check.XXXXXX")
hub_pid=""
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    local status=$?
    if [ -n "$hub_pid" ] && kill -0 "$hub_pid" 2>/dev/null; then
        kill -KILL "$hub_pid" 2>/dev/null || true
        wait "$hub_pid" 2>/dev/null || true
    fi
    if [ -n "${KEEP:-}" ]; then
        echo "check-install: kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

failures=()
say() { echo "check-install: $*"; }
pass() { say "ok   $1"; }
fail() {
    say "FAIL $1"
    failures+=("$1")
}
show() { sed 's/^/    | /' "$1" | tail -n "${2:-20}"; }

# Nothing from the checkout may leak into what is checked.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export PIP_DISABLE_PIP_VERSION_CHECK=1

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/cloudhub/__init__.py")
[ -n "$version" ] || { say "no __version__ in $root/cloudhub/__init__.py"; exit 1; }

# --- 1. the sdist and the wheel ------------------------------------------------------------
mkdir -p "$work/dist" "$work/src" "$work/run"
sdist_dir=""
if [ "$#" -ge 1 ]; then
    wheel=$1
else
    # A copy of what git tracks or would track (new files included, ignored ones not), so that
    # a stale build/, egg-info or cache of the checkout cannot reach the packages.
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$root" && git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' file; do if [ -e "$file" ]; then printf '%s\0' "$file"; fi; done |
            tar --null -T - -cf -) | tar -C "$work/src" -xf -
    else
        tar -C "$root" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
            --exclude='_trial_temp*' --exclude=__pycache__ --exclude=dropin.cache -cf - . |
            tar -C "$work/src" -xf -
    fi
    # The sdist through the PEP 517 hook of pyproject.toml's build backend (no `build` tool
    # needed), then the wheel from the unpacked sdist, as `python -m build` does: a file the
    # build needs but MANIFEST.in leaves out fails here.
    say "building the sdist"
    if ! {
        "$python" -m venv "$work/buildenv" &&
            "$python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
                "$work/src/pyproject.toml" >"$work/build-requires.txt" &&
            "$work/buildenv/bin/python" -m pip install --quiet -r "$work/build-requires.txt" &&
            (cd "$work/src" && "$work/buildenv/bin/python" -c '
import sys
from setuptools import build_meta
print(build_meta.build_sdist(sys.argv[1]))' "$work/dist")
    } >"$work/build.log" 2>&1; then
        show "$work/build.log" 40
        say "FAIL building the sdist"
        exit 1
    fi
    sdist=$(ls "$work"/dist/cloudhub-*.tar.gz)
    say "sdist: $sdist"
    tar -C "$work" -xzf "$sdist"
    sdist_dir=$(ls -d "$work"/cloudhub-*/)
    sdist_dir=${sdist_dir%/}
    sdist_listing=$(tar -tzf "$sdist" | sed 's|^[^/]*/||')
    for required in LICENSE NOTICE README.md CHANGELOG.md Makefile tox.ini Dockerfile \
        .dockerignore .ci/run twisted/plugins/cloudhub_plugin.py cloudhub/py.typed \
        cloudhub/wire/message.proto etc/cloudhub.yaml examples/embed.tac \
        tests/__init__.py tests/helpers_tls.py tests/fakes.py tests/crash_hub.py \
        tests/test_packaging.py deploy/cloudhub.container.yaml deploy/kubernetes/cloudhub.yaml \
        packaging/install.sh packaging/check-install.sh benchmarks/README.md; do
        if grep -qx "$required" <<<"$sdist_listing"; then
            pass "sdist has $required"
        else
            fail "sdist has $required"
        fi
    done
    # Every file of these folders that the checkout would commit is in the sdist.
    missing=$(cd "$work/src" && find etc examples deploy packaging tests -type f | sort |
        grep -vxF -f <(sort <<<"$sdist_listing") || true)
    if [ -z "$missing" ]; then
        pass "sdist has all of etc/ examples/ deploy/ packaging/ tests/"
    else
        fail "sdist has all of etc/ examples/ deploy/ packaging/ tests/ (missing: $(tr '\n' ' ' <<<"$missing"))"
    fi
    if grep -E '(^|/)(\.venv|_trial_temp[^/]*|__pycache__|\.hypothesis|build|dist)/|(^|/)dropin\.cache$|\.pyc$|\.egg-info/' \
        <<<"$sdist_listing" | grep -v '^cloudhub\.egg-info/' >"$work/junk.txt"; then
        fail "sdist has no .venv, _trial_temp, __pycache__, dropin.cache ($(head -n 3 "$work/junk.txt" | tr '\n' ' '))"
    else
        pass "sdist has no .venv, _trial_temp, __pycache__, dropin.cache"
    fi
    say "building the wheel from the sdist"
    "$python" -m pip wheel --quiet --no-deps -w "$work/dist" "$sdist_dir" >"$work/build.log" 2>&1 || {
        show "$work/build.log" 40
        say "FAIL building the wheel"
        exit 1
    }
    wheel=$(ls "$work"/dist/cloudhub-*.whl)
fi
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
say "wheel: $wheel"

listing=$("$python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$wheel")
for required in twisted/plugins/cloudhub_plugin.py cloudhub/py.typed cloudhub/wire/message.proto \
    cloudhub/__init__.py; do
    if grep -qx "$required" <<<"$listing"; then pass "wheel has $required"; else fail "wheel has $required"; fi
done
for forbidden in twisted/__init__.py twisted/plugins/__init__.py twisted/plugins/dropin.cache; do
    if grep -qx "$forbidden" <<<"$listing"; then fail "wheel has no $forbidden"; else pass "wheel has no $forbidden"; fi
done
if grep -E '^(tests|etc|deploy|packaging|benchmarks)/' <<<"$listing" >/dev/null; then
    fail "wheel holds only cloudhub/, twisted/plugins/ and metadata"
else
    pass "wheel holds only cloudhub/, twisted/plugins/ and metadata"
fi

# --- 2. the install -------------------------------------------------------------------------
venv=$work/venv
say "installing with packaging/install.sh into $venv"
if PYTHON=$python bash "$here/install.sh" "$venv" "$wheel" --quiet >"$work/install.log" 2>&1; then
    pass "packaging/install.sh"
else
    show "$work/install.log" 40
    fail "packaging/install.sh"
    say "cannot go on without an install"
    exit 1
fi
bin=$venv/bin

# The plugin cache install.sh writes must count as fresh in an image too, where file times are
# whole seconds: otherwise a hub on a read-only filesystem tries to rewrite it at every start.
if "$bin/python" - <<'PY'; then
import glob
import os

import twisted

plugins = os.path.join(os.path.dirname(twisted.__file__), "plugins")
cache = int(os.path.getmtime(os.path.join(plugins, "dropin.cache")))
newest = max(int(os.path.getmtime(p)) for p in glob.glob(os.path.join(plugins, "*.py")))
assert cache > newest, (cache, newest)
PY
    pass "Twisted's plugin cache is written and fresh to the second"
else
    fail "Twisted's plugin cache is written and fresh to the second"
fi

# --- 3. the installed commands, outside the checkout ------------------------------------------
cd "$work/run"

if "$bin/twistd" cloudhub --help >"$work/help.out" 2>&1 && grep -q -- "--config" "$work/help.out"; then
    pass "twistd cloudhub --help mentions --config"
else
    show "$work/help.out"
    fail "twistd cloudhub --help mentions --config"
fi

location=$("$bin/python" -c 'import cloudhub, os; print(os.path.dirname(cloudhub.__file__))')
case "$location" in
"$venv"/*) pass "cloudhub imported from the virtualenv ($location)" ;;
*) fail "cloudhub imported from the virtualenv, not $location" ;;
esac

for command in "cloudhub --version" "twistd cloudhub --version"; do
    # shellcheck disable=SC2086  # the command is split into words on purpose
    if "$bin"/$command >"$work/version.out" 2>&1 && grep -qF "$version" "$work/version.out"; then
        pass "$command prints $version"
    else
        show "$work/version.out" 5
        fail "$command prints $version"
    fi
done

# Free loopback ports (closed again before the hub binds them: a small race, fine here).
read -r ws_port https_port api_port < <("$bin/python" - <<'PY'
import socket

sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
for s in sockets:
    s.close()
PY
)

config=$work/cloudhub.yaml
# The CA and server pair paths point into the temporary directory (where they do not exist), so
# the hub generates its own under dataDir instead of using a host's /etc/kubeedge.
cat >"$config" <<EOF
cloudHub:
  tlsCAFile: $work/kubeedge/ca/rootCA.crt
  tlsCAKeyFile: $work/kubeedge/ca/rootCA.key
  tlsCertFile: $work/kubeedge/certs/server.crt
  tlsPrivateKeyFile: $work/kubeedge/certs/server.key
  websocket: {enable: true, address: 127.0.0.1, port: $ws_port}
  quic: {enable: false}
  https: {enable: true, address: 127.0.0.1, port: $https_port}
hub:
  dataDir: $work/data
  api: {enable: true, address: 127.0.0.1, port: $api_port}
EOF
broken=$work/broken.yaml
cat >"$broken" <<EOF
cloudHub:
  websocket: {port: 99999}
hub:
  dataDir: $work/data
EOF

if "$bin/cloudhub" check-config --config "$config" >"$work/check.out" 2>"$work/check.err" &&
    "$bin/python" -c '
import sys, yaml
settings = yaml.safe_load(open(sys.argv[1]))
assert settings["hub"]["dataDir"] == sys.argv[2], settings["hub"]
assert settings["cloudHub"]["websocket"]["port"] == int(sys.argv[3]), settings["cloudHub"]
' "$work/check.out" "$work/data" "$ws_port" 2>>"$work/check.err"; then
    pass "cloudhub check-config prints the effective config, exit 0"
else
    show "$work/check.out" 10
    show "$work/check.err" 10
    fail "cloudhub check-config prints the effective config, exit 0"
fi

status=0
"$bin/cloudhub" check-config --config "$broken" >"$work/check.out" 2>"$work/check.err" || status=$?
if [ "$status" -eq 1 ] && [ "$(wc -l <"$work/check.err")" -eq 1 ] &&
    grep -q "^cloudhub: .*websocket.port" "$work/check.err"; then
    pass "cloudhub check-config on a broken config: exit 1, one line"
else
    show "$work/check.err" 10
    fail "cloudhub check-config on a broken config: exit 1, one line (got exit $status)"
fi

status=0
timeout 60 "$bin/twistd" -n cloudhub --config "$broken" >"$work/broken.log" 2>&1 || status=$?
if [ "$status" -ne 0 ] && grep -q "cloudhub: .*websocket.port" "$work/broken.log"; then
    pass "twistd -n cloudhub refuses a broken config (exit $status)"
else
    show "$work/broken.log" 10
    fail "twistd -n cloudhub refuses a broken config (got exit $status)"
fi
if [ -e "$work/data/cloudhub.db" ]; then fail "a refused config creates no store"; fi

# --- 4. a real hub, outside the checkout ----------------------------------------------------------------------------
# The Dockerfile's command line (JSON logs), on the temporary config.
say "starting twistd -n cloudhub (websocket $ws_port, https $https_port, api $api_port)"
CLOUDHUB_LOG_FORMAT=json "$bin/twistd" -n --pidfile= --logger cloudhub.logs.observer \
    cloudhub --config "$config" >"$work/hub.log" 2>&1 &
hub_pid=$!

# Ready: the hub's /readyz ("ok" once every listener is up) on the certificate server, whose
# TLS is checked against the CA the hub generated in dataDir; then the API answers over HTTP.
if "$bin/python" - "$https_port" "$api_port" "$work/data/ca/rootCA.crt" "$ready_timeout" \
    "$hub_pid" >"$work/ready.out" 2>&1 <<'PY'; then
import json
import os
import ssl
import sys
import time
import urllib.request

https_port, api_port, ca_file, timeout, pid = sys.argv[1:]
deadline = time.monotonic() + float(timeout)
last = "nothing yet"
while True:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        sys.exit(f"the hub exited before it was ready (last: {last})")
    if os.path.exists(ca_file):
        try:
            context = ssl.create_default_context(cafile=ca_file)
            url = f"https://127.0.0.1:{https_port}/readyz"
            with urllib.request.urlopen(url, context=context, timeout=2) as answer:
                body = answer.read()
            if answer.status == 200 and body == b"ok":
                break
            last = f"{answer.status} {body!r}"
        except Exception as e:  # not listening yet, 503 while starting, ...
            last = repr(e)
    if time.monotonic() > deadline:
        sys.exit(f"not ready within {timeout} s (last: {last})")
    time.sleep(0.25)
print(f"ready after {float(timeout) - (deadline - time.monotonic()):.1f} s")
with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/openapi.json", timeout=5) as answer:
    assert answer.status == 200, answer.status
    assert "openapi" in json.load(answer)
with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/nodes", timeout=5) as answer:
    assert answer.status == 200, answer.status
with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/readyz", timeout=5) as answer:
    assert json.load(answer) == {"status": "ok"}, answer.status
PY
    pass "hub ready: https /readyz 200 ok, API /readyz ok and answers ($(tail -n 1 "$work/ready.out"))"
else
    show "$work/ready.out" 5
    show "$work/hub.log" 30
    fail "hub ready within ${ready_timeout} s"
fi

if grep -q '^{' "$work/hub.log" && ! grep -v '^{' "$work/hub.log" | grep -q .; then
    pass "hub log is JSON lines"
else
    show "$work/hub.log" 10
    fail "hub log is JSON lines"
fi

if kill -0 "$hub_pid" 2>/dev/null; then
    kill -TERM "$hub_pid"
    waited=0
    while kill -0 "$hub_pid" 2>/dev/null && [ "$waited" -lt $((stop_timeout * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$hub_pid" 2>/dev/null; then
        show "$work/hub.log" 20
        fail "hub stops on SIGTERM within ${stop_timeout} s"
    else
        status=0
        wait "$hub_pid" || status=$?
        hub_pid=""
        if [ "$status" -eq 0 ]; then
            pass "hub stops on SIGTERM with exit status 0"
        else
            show "$work/hub.log" 20
            fail "hub stops on SIGTERM with exit status 0 (got $status)"
        fi
    fi
else
    status=0
    wait "$hub_pid" || status=$?
    hub_pid=""
    show "$work/hub.log" 30
    fail "hub still running before SIGTERM (exited with $status)"
fi
if [ -s "$work/data/cloudhub.db" ]; then pass "store created in dataDir"; else fail "store created in dataDir"; fi

# --- 5. the tests from the sdist ------------------------------------------------------------
# The unpacked sdist holds what the test suite needs: run a few modules from it (cloudhub is
# then imported from the unpacked sdist, the dependencies from the virtualenv).
if [ -n "$sdist_dir" ]; then
    # The `test` extra: what the wheel's metadata asks for it.
    if "$bin/python" -m pip install --quiet "${wheel}[test]" >"$work/tests.log" 2>&1 &&
        (cd "$sdist_dir" && "$bin/python" -m twisted.trial tests.test_config tests.test_wire_packer \
            tests.test_packaging) >>"$work/tests.log" 2>&1; then
        pass "tests from the sdist: $(grep -E '^PASSED' "$work/tests.log" | tail -n 1)"
    else
        show "$work/tests.log" 30
        fail "tests from the sdist (test_config, test_wire_packer, test_packaging)"
    fi
fi

# --- result -----------------------------------------------------------------------------------
if [ "${#failures[@]}" -eq 0 ]; then
    say "all checks passed (cloudhub $version)"
    exit 0
fi
say "${#failures[@]} check(s) failed:"
printf '    - %s\n' "${failures[@]}"
exit 1
