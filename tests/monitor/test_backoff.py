"""The one back-off rule the service, the notifier and the webhook share: base x 2^attempt, capped."""

from __future__ import annotations

import pytest

from monitor.backoff import Backoff


def test_delays_double_from_the_base_up_to_the_cap():
    b = Backoff(base_s=1.0, max_s=30.0)
    assert [b.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30  # no float overflow after a long outage


def test_a_zero_base_never_waits_and_bad_values_are_refused():
    assert Backoff(base_s=0, max_s=5).delay(3) == 0
    with pytest.raises(ValueError):
        Backoff(base_s=-1, max_s=5)
    with pytest.raises(ValueError):
        Backoff(base_s=1, max_s=5).delay(-1)


def test_retry_calls_again_after_each_failure_with_the_growing_delay():
    import threading

    calls, heard = [], []

    def make() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "client"

    b = Backoff(base_s=0.001, max_s=0.002)
    assert b.retry(make, retry_on=(ConnectionError,), stop=threading.Event(),
                   on_retry=lambda exc, delay: heard.append(delay)) == "client"
    assert len(calls) == 3 and heard == [0.001, 0.002]


def test_retry_stops_when_the_operator_stops_and_other_errors_are_not_retried():
    import threading

    from monitor.backoff import StoppedWhileConnecting

    stop = threading.Event()

    def refuse() -> None:
        stop.set()  # SIGTERM arrives while the broker does not answer
        raise ConnectionError("refused")

    with pytest.raises(StoppedWhileConnecting):
        Backoff(base_s=60, max_s=60).retry(refuse, retry_on=(ConnectionError,), stop=stop)
    with pytest.raises(ValueError):
        Backoff(base_s=0, max_s=0).retry(lambda: int("x"), retry_on=(ConnectionError,))
