"""Canonical request keys and payloads (invariant 6): pure, no servers.

The same call gives the same key however it is spelled; different values give different keys;
unsupported types are refused with a TypeError naming the argument's path; supported types
round-trip exactly through the payload a worker decodes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import uuid

import pytest
from celery import Celery

from girder_celery import Girder, request_key
from girder_celery.keys import MAX_DEPTH, bind_arguments, binder, decode_payload, encode_payload
from tests.harness import ROOT

pytestmark = pytest.mark.invariant6


def f(x, y=0):
    return x + y


SIG = inspect.signature(f)


@pytest.fixture(scope="module")
def tasks():
    """Girder tasks on an app of their own; computing keys touches no server."""
    app = Celery("keys-test", broker="memory://", set_as_current=False)
    girder = Girder(app, url="redis://127.0.0.1:1/0")

    @girder.task(name="k.add")
    def add(x, y=0):
        return x + y

    # The same task at version 2, as a later deploy of the same code base would define it.
    app_v2 = Celery("keys-test-v2", broker="memory://", set_as_current=False)

    @Girder(app_v2, url="redis://127.0.0.1:1/0").task(name="k.add", version="2")
    def add_v2(x, y=0):
        return x + y

    @girder.task(name="k.star")
    def star(a, *args, b=1, **kwargs):
        return a

    return {"add": add, "add_v2": add_v2, "star": star}


# -- same call, same key ------------------------------------------------------------------


def test_spellings_of_one_call_share_a_key():
    """Positional and keyword spellings of one call, in any order, share one key (invariant 6)."""
    spellings = [
        request_key("f", (1, 2), signature=SIG),
        request_key("f", (1,), {"y": 2}, signature=SIG),
        request_key("f", (), {"x": 1, "y": 2}, signature=SIG),
        request_key("f", (), {"y": 2, "x": 1}, signature=SIG),
    ]
    assert len(set(spellings)) == 1


def test_defaults_are_applied_before_hashing():
    """Defaults are filled in before hashing: f(1) and f(1, 0) share a key, f(1, 1) does not."""
    assert request_key("f", (1,), signature=SIG) == request_key("f", (1, 0), signature=SIG)
    assert request_key("f", (), {"x": 1}, signature=SIG) == request_key("f", (1, 0), signature=SIG)
    assert request_key("f", (1,), signature=SIG) != request_key("f", (1, 1), signature=SIG)


def test_task_key_binds_to_the_function_signature(tasks):
    """A task's key binds the call to its function's signature: every spelling gives one key."""
    add = tasks["add"]
    key = add.key(1, 2)
    assert add.key(1, y=2) == add.key(x=1, y=2) == add.key(y=2, x=1) == key
    assert add.key(1) == add.key(1, 0) == request_key("k.add", (1, 0))
    assert key == request_key("k.add", (1, 2))
    assert add.key(1, 2) != add.key(2, 1)


def test_task_key_with_var_arguments(tasks):
    """With *args and **kwargs, keyword order and spelled-out defaults do not change the key."""
    star = tasks["star"]
    assert star.key(1, 2, 3, c=4, d=5) == star.key(1, 2, 3, d=5, c=4) == star.key(1, 2, 3, b=1, c=4, d=5)
    assert star.key(1, 2, 3) != star.key(1, 2)
    assert star.key(1, b=2) != star.key(1)


def test_a_call_that_does_not_fit_the_signature_raises_type_error(tasks):
    """A call that does not fit the signature gets no key: a TypeError naming the task."""
    with pytest.raises(TypeError, match=r"k\.add"):
        tasks["add"].key(1, 2, 3)
    with pytest.raises(TypeError, match=r"k\.add"):
        tasks["add"].key(z=1)
    with pytest.raises(TypeError):
        request_key("f", (1, 2, 3), signature=SIG)


def _positional_only(a, b, /, c=3):
    return a


@pytest.mark.parametrize("fn", [f, _positional_only, lambda: 0, lambda *a, k=1: 0])
def test_the_binder_of_a_signature_binds_as_signature_bind_does(fn):
    """A task's binder (with its fast path for positional calls) agrees with Signature.bind
    on every call, and raises the same TypeError where the call does not fit."""
    sig = inspect.signature(fn)
    bind = binder(sig)
    calls = [((), {}), ((1,), {}), ((1, 2), {}), ((1, 2, 3), {}), ((1, 2, 3, 4), {}), ([1, 2], {}), ((1,), {"y": 2})]
    for args, kwargs in calls:
        try:
            want = bind_arguments(sig, args, kwargs)
        except TypeError as exc:
            with pytest.raises(TypeError, match=re.escape(str(exc))):
                bind(args, kwargs)
        else:
            assert bind(args, kwargs) == want, (args, kwargs)


def test_dict_order_never_matters():
    """Dict order never changes a key, with str keys or keys of mixed types."""
    a = {"b": 2, "a": 1, "c": {"y": [1, 2], "x": None}}
    b = {"c": {"x": None, "y": [1, 2]}, "a": 1, "b": 2}
    assert request_key("f", (a,)) == request_key("f", (b,))
    mixed_a = {1: "a", "1": "b", 2.5: "c", None: "d", False: "e"}
    mixed_b = dict(reversed(list(mixed_a.items())))
    assert list(mixed_a) != list(mixed_b)
    assert request_key("f", (mixed_a,)) == request_key("f", (mixed_b,))
    assert request_key("f", (), {"x": 1, "y": 2}) == request_key("f", (), {"y": 2, "x": 1})


def test_tuple_and_list_with_the_same_items_share_a_key():
    """A tuple and the list with the same items share a key (both arrive as that list)."""
    assert request_key("f", ((1, 2),)) == request_key("f", ([1, 2],))
    assert request_key("f", ({"a": (1, (2, 3))},)) == request_key("f", ({"a": [1, [2, 3]]},))
    assert request_key("f", (1, 2)) == request_key("f", [1, 2])


# -- different values, different keys ----------------------------------------------------


DISTINCT = [
    1,
    1.0,
    True,
    "1",
    [1],
    {"1": 1},
    {1: 1},
    {1.0: 1},
    {True: 1},
    b"1",
    None,
    0,
    0.0,
    -0.0,
    False,
    "",
    [],
    {},
    [[]],
    "true",
    "null",
    dt.date(2020, 1, 1),
    dt.datetime(2020, 1, 1),
    "2020-01-01",
    decimal.Decimal("1"),
    uuid.UUID(int=1),
    str(uuid.UUID(int=1)),
    # A user dict shaped like girder's own tagged values must not collide with them.
    {"__girder__": "bytes", "v": "MQ=="},
    {"__girder__": "dict", "v": [[1, 1]]},
]


def test_distinct_values_give_distinct_keys():
    """1, 1.0, True, '1', {1: x}, {'1': x} and the rest of DISTINCT give distinct keys (invariant 6)."""
    keys = [request_key("f", (v,)) for v in DISTINCT]
    dupes = [(DISTINCT[i], DISTINCT[j]) for i, j in itertools.combinations(range(len(keys)), 2) if keys[i] == keys[j]]
    assert dupes == []


def test_name_and_position_are_part_of_the_key():
    """The task name and where each argument goes are part of the key."""
    assert request_key("f", (1,)) != request_key("g", (1,))
    assert request_key("f", (1, 2)) != request_key("f", (2, 1))
    assert request_key("f", (), {"x": 1}) != request_key("f", (1,))


def test_version_changes_the_key(tasks):
    """A task's version is part of its key: each version has keys of its own."""
    plain = request_key("f", (1,))
    assert request_key("f", (1,), version="2") != plain
    assert request_key("f", (1,), version="2") != request_key("f", (1,), version="3")
    assert request_key("f", (1,), version="2") == request_key("f", (1,), version="2")
    assert tasks["add_v2"].key(1, 2) == request_key("k.add", (1, 2), version="2")
    assert tasks["add_v2"].key(1, 2) != tasks["add"].key(1, 2)


def test_key_is_sha256_hex():
    """A key is a SHA-256 digest in 64 hex digits."""
    key = request_key("f", (1, {"a": b"x"}))
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_key_is_stable_across_processes_and_hash_seeds():
    """Keys are shared by every process of the grid: no dependence on hash randomisation."""
    value = {f"k{i}": i for i in range(50)} | {i: str(i) for i in range(50)}
    code = (
        "import sys, json; from girder_celery import request_key; "
        "v = {f'k{i}': i for i in range(50)} | {i: str(i) for i in range(50)}; "
        "print(request_key('f', (v, b'x', 1.5), {'z': None}))"
    )
    expected = request_key("f", (value, b"x", 1.5), {"z": None})
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == expected, out.stderr


# -- refused before anything is sent -----------------------------------------------------


class Thing:
    pass


@pytest.mark.parametrize(
    "args, kwargs, path",
    [
        (({"a": [1, 2, Thing()]},), {}, "args[0]['a'][2]"),
        ((1, {1, 2}), {}, "args[1]"),
        ((), {"z": [object()]}, "kwargs['z'][0]"),
        (([{"k": 1j}],), {}, "args[0][0]['k']"),
        ((bytearray(b"x"),), {}, "args[0]"),
        ((range(3),), {}, "args[0]"),
        (({(1, 2): "tuple key"},), {}, "args[0]"),
        (({1: {frozenset(): 1}},), {}, "args[0][1]"),
    ],
)
def test_unsupported_types_raise_type_error_naming_the_path(args, kwargs, path):
    """An unsupported type is refused with a TypeError naming its path in the arguments (invariant 6)."""
    with pytest.raises(TypeError) as info:
        request_key("f", args, kwargs)
    assert path in str(info.value)


def test_task_key_names_the_argument_path(tasks):
    """A task's key refuses an unsupported argument with a TypeError naming its path."""
    with pytest.raises(TypeError, match=re.escape("args[1]['a'][0]")):
        tasks["add"].key(1, {"a": [Thing()]})
    with pytest.raises(TypeError, match=re.escape("args[0]")):
        tasks["add"].key(x=object())


def test_request_key_checks_name_and_version():
    """request_key refuses an empty or missing name and a version that is not a str."""
    with pytest.raises(TypeError):
        request_key("", ())
    with pytest.raises(TypeError):
        request_key(None, ())
    with pytest.raises(TypeError):
        request_key("f", (), version=2)


# -- payloads round-trip exactly ----------------------------------------------------------


ROUND_TRIP = [
    b"\x00\xffbytes",
    b"",
    dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.date(1999, 12, 31),
    dt.time(7, 8, 9, 10),
    dt.time(7, 8, tzinfo=dt.timezone.utc),
    decimal.Decimal("1.10"),
    decimal.Decimal("-0"),
    decimal.Decimal("1E+30"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {1: "a", 2: {"b": [b"c", None]}},
    {1.5: 1, None: 2, True: 3, "s": 4},
    {"__girder__": "bytes", "v": "MQ=="},
    [1, [2, [3, {"x": (4, 5)}]]],
    "unicode \u00e9\u4e2d\U0001f600",
    2**100,
    -0.0,
    float("inf"),
    None,
    {},
    [],
]


def _same(a, b) -> bool:
    """Equal with the same types all the way down (tuples arrive as lists)."""
    if isinstance(a, tuple):
        a = list(a)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        same_keys = sorted(map(repr, a)) == sorted(map(repr, b))  # repr: True and 1 differ
        return same_keys and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (float, decimal.Decimal)):
        return str(a) == str(b)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset()
    return a == b


@pytest.mark.invariant7
@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_supported_types_round_trip_exactly(value):
    """Each supported type comes back from the JSON payload with its value and type (invariant 7)."""
    args, kwargs = decode_payload(encode_payload((value,), {"kw": value}))
    assert _same(value, args[0]), (value, args[0])
    assert _same(value, kwargs["kw"]), (value, kwargs["kw"])


@pytest.mark.invariant7
def test_nested_mix_round_trips_and_is_json_text():
    """A nested mix of tagged types round-trips, and the payload is JSON text (invariant 7)."""
    value = {
        "when": dt.datetime(2021, 1, 2, 3, 4, 5),
        "ids": [uuid.UUID(int=7), uuid.UUID(int=8)],
        7: {"raw": b"\x01\x02", "money": decimal.Decimal("0.30"), "day": dt.date(2021, 1, 2)},
        "t": (1, 2.5, "x"),
    }
    payload = encode_payload((value,), {})
    json.loads(payload)  # JSON text, nothing else (invariant 7)
    args, _ = decode_payload(payload)
    assert _same(value, args[0])
    assert args[0]["t"] == [1, 2.5, "x"] and type(args[0]["t"]) is list


@pytest.mark.invariant7
def test_nan_round_trips():
    """NaN comes back from the JSON payload as NaN."""
    args, _ = decode_payload(encode_payload((float("nan"),), {}))
    assert math.isnan(args[0])


def test_str_with_a_lone_surrogate_gets_a_key_and_round_trips():
    """A str is a supported type, including the surrogate-escaped text ``os.fsdecode`` returns
    for a file name that is not UTF-8; it must not fail with an anonymous UnicodeEncodeError."""
    name = os.fsdecode(b"report-\xff.csv")
    key = request_key("f", (name,))
    assert key != request_key("f", ("report-.csv",))
    args, _ = decode_payload(encode_payload((name,), {}))
    assert args == [name]


def nested(depth: int, kind: str = "list") -> object:
    """``depth`` lists (or dicts, or alternating) nested in one another around a 1."""
    value: object = 1
    for level in range(depth):
        use_dict = kind == "dict" or (kind == "mix" and level % 2)
        value = {"k": value} if use_dict else [value]
    return value


@pytest.mark.parametrize("kind", ["list", "dict", "mix"])
def test_arguments_nested_to_the_depth_limit_get_a_key_and_round_trip(kind):
    """An argument nesting exactly MAX_DEPTH lists, tuples and dicts is supported and round-trips."""
    value = nested(MAX_DEPTH, kind)
    args, _ = decode_payload(encode_payload((value,), {}))
    assert args == [value]
    assert request_key("f", (value,)) != request_key("f", (nested(MAX_DEPTH - 1, kind),))


@pytest.mark.parametrize("kind", ["list", "dict", "mix"])
def test_arguments_nested_past_the_depth_limit_raise_type_error_naming_limit_and_path(kind):
    """One level past MAX_DEPTH is refused with a TypeError naming the limit and the argument's path."""
    with pytest.raises(TypeError) as info:
        request_key("f", (0, nested(MAX_DEPTH + 1, kind)))
    message = str(info.value)
    assert f"deeper than {MAX_DEPTH} levels" in message and "MAX_DEPTH" in message
    assert message.startswith("args[1][") and "..." in message  # the path, shortened in the middle


def test_a_deeply_nested_argument_is_a_type_error_not_a_recursion_error(tasks):
    """Nesting far past Python's recursion limit is still a TypeError at the call site, naming the path."""
    deep = nested(50 * sys.getrecursionlimit())
    with pytest.raises(TypeError, match=re.escape(f"deeper than {MAX_DEPTH} levels")) as info:
        tasks["star"].key(1, z=deep)
    assert str(info.value).startswith("kwargs['z'][0][0]")
    with pytest.raises(TypeError, match=re.escape("args[0]")):
        tasks["add"].key((deep,))  # a tuple is a level too
