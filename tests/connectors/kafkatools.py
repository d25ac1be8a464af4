"""Moved to tests/support/kafkatools.py (issue 19). This alias keeps open branches' imports working until they are
merged; import `tests.support.kafkatools` in new code. Remove once nothing imports `tests.connectors.kafkatools`."""

import sys

from tests.support import kafkatools

sys.modules[__name__] = kafkatools
