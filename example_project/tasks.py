"""The post's examples as girder tasks: portfolio pricing, ``ratio``/``divide`` and ``bogosity``.

Each task is a function of its arguments only, so girder memoizes it under its request key, and
a task that needs another's value simply requests it (``girder.requests``, ``task.call``) and
waits: the data-flow graph is the call stack.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time

from example_project.celery_app import girder

#: Monte Carlo paths per price (antithetic pairs): a few tens of milliseconds of pure Python.
PATHS = 60_000


def instruments(spec: str) -> list[tuple[float, dict]]:
    """The positions a portfolio spec stands for, as ``(quantity, instrument details)``.

    Stands in for the post's ``munge`` and ``diddle``: calls and puts on the ticker ``spec`` at
    three strikes around its spot. Quantities stay out of the details, so two portfolios holding
    the same instrument share one memoized price.
    """
    spot = 50.0 + int(hashlib.sha256(spec.encode()).hexdigest()[:6], 16) % 10_000 / 100
    positions = []
    for kind, quantity in (("call", 100.0), ("put", -50.0)):
        for moneyness in (0.9, 1.0, 1.1):
            details = {
                "ticker": spec,
                "kind": kind,
                "strike": round(spot * moneyness, 2),
                "spot": round(spot, 2),
                "vol": 0.25,
                "rate": 0.02,
                "maturity": 1.0,
            }
            positions.append((quantity, details))
    return positions


@girder.task(version="1")
def calc_price(details: dict) -> float:
    """A European option's price by Monte Carlo under Black-Scholes dynamics.

    Deterministic: the random seed is a hash of the instrument's details, so the same details
    always give the same price (and memoizing it is safe).
    """
    seed = int.from_bytes(hashlib.sha256(json.dumps(details, sort_keys=True).encode()).digest()[:8], "big")
    rng = random.Random(seed)
    spot, strike = float(details["spot"]), float(details["strike"])
    rate, vol, maturity = float(details["rate"]), float(details["vol"]), float(details["maturity"])
    call = details["kind"] == "call"
    drift = (rate - vol * vol / 2) * maturity
    spread = vol * math.sqrt(maturity)
    total = 0.0
    for _ in range(PATHS // 2):
        z = rng.gauss(0.0, 1.0)
        for end in (spot * math.exp(drift + spread * z), spot * math.exp(drift - spread * z)):
            total += max(end - strike, 0.0) if call else max(strike - end, 0.0)
    return round(math.exp(-rate * maturity) * total / (PATHS // 2 * 2), 6)


@girder.task
def calc_portfolio(spec: str) -> float:
    """The value of the portfolio ``spec``: its instruments are priced in parallel on the grid."""
    positions = instruments(spec)
    prices = girder.requests([calc_price.s(details) for _, details in positions])
    return round(sum(quantity * price for (quantity, _), price in zip(positions, prices)), 6)


@girder.task
def divide(x: float, y: float) -> float:
    return float(x / y)


@girder.task
def ratio(i: int) -> float:
    """``i / (i - 1)``, computed by requesting ``divide``: ``ratio(1)`` fails inside ``divide``."""
    return divide.call(i, i - 1)


@girder.task(bind=True)
def bogosity(self, msec: int, jobnum: int, reclevel: int, numrecjobs: int, args) -> str:
    """The post's recursion test: request ``reclevel`` sub-requests one level down, sleep, and
    report where each ran. The node name makes the result nondeterministic; vary ``args`` to
    thwart the cache between runs."""
    values = girder.requests([bogosity.s(msec, k, reclevel - 1, numrecjobs, args) for k in range(reclevel)])
    time.sleep(msec / 1000)
    node = self.request.hostname
    return f"Bogosity:{node}:{jobnum}:{msec}:{reclevel}:{args}:[{','.join(values)}]"
