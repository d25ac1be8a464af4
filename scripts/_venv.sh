# Sourced by scripts/demo and scripts/test: create .venv with a supported Python (3.11 or 3.12) and install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=""
for candidate in python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null; then
    py=$candidate; break
  fi
done
if [ -z "$py" ]; then
  echo "error: needs Python 3.11 or 3.12 (durable_rules does not import on 3.13); install one and retry" >&2
  exit 2
fi
if ! command -v gcc >/dev/null 2>&1; then
  echo "error: gcc is needed to build durable_rules' C core (Debian: apt-get install gcc python3-dev)" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
target="."
[ -n "${EXTRAS:-}" ] && target=".[${EXTRAS}]"
echo "installing into .venv (the first time builds durable_rules' C core: about a minute) ..." >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" 2>&1 | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
.venv/bin/python -c 'import durable, monitor' || { echo "error: installation failed" >&2; exit 2; }
