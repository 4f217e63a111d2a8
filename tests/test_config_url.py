"""Driver configs from URLs: round trips, pickling, sizes, and typed errors."""

from __future__ import annotations

import contextlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import ConfigError, KVStoreError
from kvstore.registry import parse_url
from kvstore.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "url",
    [
        "cpu://",
        "cpu://?capacity=4GiB",
        "nvme:///var/cache/kv?capacity=64GiB",
        "nvme://relative/dir?capacity=1GiB",
    ],
)
def test_round_trip_and_pickle(url: str) -> None:
    config = parse_url(url)
    again = type(config).from_url(config.to_url())
    assert again == config
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    "url",
    [
        "cpu",
        "cpu:/x",
        "cpu://?capacity=lots",
        "cpu://?capacity=1GiB&capacity=2GiB",
        "cpu://?nosuchoption=1",
        "cpu://somewhere",
        "cpu://#frag",
        "nvme://",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64GiB", 64 << 30), ("1.5KiB", 1536), ("2MB", 2_000_000), ("0", 0)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=1 << 50))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=60))
def test_arbitrary_urls_give_typed_errors_only(text: str) -> None:
    with contextlib.suppress(KVStoreError):
        parse_url(text)


def test_errors_pickle_with_driver_name() -> None:
    error = ConfigError("bad", driver="nvme")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ConfigError and again.driver == "nvme" and str(again) == "[nvme] bad"
