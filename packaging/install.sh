#!/usr/bin/env bash
# Install cloudhub from a wheel into a virtualenv at PREFIX: the one install procedure, used by
# the Dockerfile and tested by packaging/check-install.sh (`make package-check`, CI).
#
#   packaging/install.sh PREFIX WHEEL [PIP ARGUMENTS...]
#   packaging/install.sh /opt/cloudhub dist/cloudhub-0.1.0-py3-none-any.whl
#
# PREFIX is created as a virtualenv when it is not one already (an existing one is upgraded in
# place). Dependencies come from the package index pip is configured with (PIP_INDEX_URL,
# PIP_NO_CACHE_DIR, ... are honoured; extra arguments such as `-c constraints.txt` go to pip).
# PYTHON picks the interpreter (default python3, 3.11 or newer). Afterwards PREFIX/bin holds
# `twistd` and `cloudhub`: run the hub with
#   PREFIX/bin/twistd -n cloudhub --config /etc/cloudhub/cloudhub.yaml
set -euo pipefail

usage() {
    echo "usage: $0 PREFIX WHEEL [PIP ARGUMENTS...]" >&2
    exit 2
}
[ "$#" -ge 2 ] || usage
prefix=$1
wheel=$2
shift 2
python=${PYTHON:-python3}

case "$wheel" in
*.whl) ;;
*) echo "install.sh: $wheel: not a wheel (.whl)" >&2; exit 2 ;;
esac
[ -f "$wheel" ] || { echo "install.sh: $wheel: no such file" >&2; exit 2; }

if [ ! -x "$prefix/bin/python" ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "install.sh: $python is older than Python 3.11" >&2
        exit 1
    }
    "$python" -m venv "$prefix"
else
    # An upgrade in place, possibly by a rebuilt wheel of the same version: replace it.
    "$prefix/bin/python" -m pip uninstall --yes --quiet cloudhub >/dev/null 2>&1 || true
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$prefix/bin/python" -m pip install --upgrade "$@" "$wheel"

# twistd finds the hub through twisted/plugins/cloudhub_plugin.py. Looking the plugins up once
# now writes Twisted's plugin cache (dropin.cache) while PREFIX is writable, so that a hub on a
# read-only filesystem (a container) does not try to; it also fails the install if the plugin
# is missing. Twisted takes the cache for stale unless its time is later than every plugin
# module's, and image layers keep whole seconds: hence a cache at least a second younger.
sleep 1
"$prefix/bin/python" - <<'PY'
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

names = [plugin.tapname for plugin in getPlugins(IServiceMaker)]
if "cloudhub" not in names:
    raise SystemExit(f"install.sh: twistd has no cloudhub plugin (found: {sorted(names)})")
PY
"$prefix/bin/twistd" cloudhub --help >/dev/null

version=$("$prefix/bin/python" -c 'import cloudhub; print(cloudhub.__version__)')
echo "install.sh: cloudhub $version installed in $prefix (run: $prefix/bin/twistd -n cloudhub --config FILE)"
