#!/usr/bin/env bash
# Offline checks of the deployment files: Prometheus rules and their unit tests, the Prometheus configuration,
# the Alertmanager configuration and its routing cases. Needs promtool and amtool (Debian: prometheus,
# prometheus-alertmanager). Run from anywhere; exits non-zero on the first failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/prometheus"
promtool check rules protocol-monitor.rules.yml
promtool test rules protocol-monitor.rules.test.yml
promtool check config --syntax-only prometheus.yml
cd "$here/alertmanager"
amtool check-config alertmanager.yml
failures=0
while IFS='|' read -r expected labels; do
  case "$expected" in ''|'#'*) continue ;; esac
  expected=$(echo "$expected" | xargs)
  # shellcheck disable=SC2086
  if ! amtool config routes test --config.file=alertmanager.yml --verify.receivers="$expected" $labels >/dev/null 2>&1; then
    echo "route FAILED: $labels -> expected $expected, got $(amtool config routes test --config.file=alertmanager.yml $labels)"
    failures=$((failures + 1))
  else
    echo "route ok: $labels -> $expected"
  fi
done < routes.test
[ "$failures" -eq 0 ]
echo "deploy checks passed"
