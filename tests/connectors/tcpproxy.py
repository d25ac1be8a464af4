"""Moved to tests/support/tcpproxy.py (issue 19). This alias keeps open branches' imports working until they are
merged; import `tests.support.tcpproxy` in new code. Remove once nothing imports `tests.connectors.tcpproxy`."""

import sys

from tests.support import tcpproxy

sys.modules[__name__] = tcpproxy
