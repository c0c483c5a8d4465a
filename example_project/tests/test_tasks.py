"""The post's examples on a real worker: a portfolio priced there, memoized the second time, and
``ratio(1)``'s error naming the ``divide`` it came from."""

from __future__ import annotations

import pytest

from example_project.tasks import calc_portfolio, calc_price, instruments, ratio
from girder_celery import GirderError


def test_a_portfolio_is_priced_on_the_worker(girder_worker, girder_store_clean):
    """calc_portfolio and each calc_price it requests run on the worker; the value sums the positions."""
    girder = girder_store_clean
    value = calc_portfolio.call("XYZ")
    positions = instruments("XYZ")
    prices = girder.requests([calc_price.s(details) for _, details in positions])
    assert value == round(sum(quantity * price for (quantity, _), price in zip(positions, prices)), 6)
    sigs = [calc_portfolio.s("XYZ")] + [calc_price.s(details) for _, details in positions]
    assert {girder.state(sig)["node"] for sig in sigs} == {girder_worker.hostname}
    assert calc_portfolio.delay("XYZ").get(timeout=30) == value  # the result backend is the plugin's too


def test_the_second_request_is_memoized(girder_worker, girder_store_clean):
    """A second request for the portfolio is answered from the store: no record changes, nothing runs."""
    girder = girder_store_clean
    sigs = [calc_portfolio.s("ABC")] + [calc_price.s(details) for _, details in instruments("ABC")]
    first = calc_portfolio.call("ABC")
    before = [girder.state(sig) for sig in sigs]
    assert [state["attempts"] for state in before] == [1] * len(sigs)
    assert calc_portfolio.call("ABC") == first
    assert [girder.state(sig) for sig in sigs] == before


def test_ratio_of_1_fails_in_divide_and_says_so(girder_worker, girder_store_clean):
    """ratio(1) raises a GirderError whose chain ends in divide(1, 0)'s ZeroDivisionError; ratio(5) is 1.25."""
    with pytest.raises(GirderError) as info:
        ratio.call(1)
    assert type(info.value) is GirderError  # not a timeout, not a lost store
    chain = info.value.chain()
    assert [link.request for link in chain] == ["example_project.tasks.ratio(1)", "example_project.tasks.divide(1, 0)"]
    assert chain[-1].exc_type == "ZeroDivisionError"
    assert ratio.call(5) == 1.25
