"""Driver registration: entry points, duplicates, broken plugins, install hints."""

from __future__ import annotations

import types

import pytest

from kvstore.cli import main
from kvstore.errors import DriverLoadError, NotFoundError
from kvstore.registry import DriverInfo, DriverRegistry, default_registry, hookimpl


def plugin(
    scheme: str, target: str = "kvstore.drivers.cpu.driver:CpuDriver", **extra: str
) -> object:
    module = types.ModuleType(f"plugin_{scheme}")

    @hookimpl
    def kvstore_driver() -> DriverInfo:
        return DriverInfo(scheme=scheme, target=target, summary="test", **extra)

    module.kvstore_driver = kvstore_driver  # type: ignore[attr-defined]
    return module


def test_shipped_drivers_come_from_entry_points() -> None:
    registry = default_registry()
    schemes = {d.info.scheme: d for d in registry.drivers()}
    assert {"cpu", "nvme"} <= set(schemes)
    assert schemes["cpu"].source.startswith("kvstore-llm ")
    assert registry.get("nvme").load().__name__ == "NvmeDriver"


def test_duplicate_scheme_is_loud() -> None:
    registry = DriverRegistry()
    registry.register(plugin("demo"), name="demo", source="first-dist 1.0")
    with pytest.raises(DriverLoadError, match=r"registered twice.*first-dist.*second-dist"):
        registry.register(plugin("demo"), name="demo", source="second-dist 2.0")


def test_one_plugin_for_two_schemes_says_what_to_do() -> None:
    registry = DriverRegistry()
    shared = plugin("first")
    registry.register(shared, name="first", source="dist 1.0")
    with pytest.raises(DriverLoadError, match=r"already registers scheme 'first'.*own plugin"):
        registry.register(shared, name="second", source="dist 1.0")
    assert [d.info.scheme for d in registry.drivers()] == ["first"]


def test_scheme_must_match_entry_point_name() -> None:
    registry = DriverRegistry()
    with pytest.raises(DriverLoadError, match="scheme"):
        registry.register(plugin("other"), name="demo", source="dist")
    assert registry.drivers() == []


def test_plugin_without_hook_is_loud() -> None:
    registry = DriverRegistry()
    with pytest.raises(DriverLoadError, match="kvstore_driver"):
        registry.register(types.ModuleType("empty"), name="empty", source="dist")


def test_missing_dependency_names_the_extra() -> None:
    registry = DriverRegistry()
    registry.register(
        plugin(
            "needy",
            target="kvstore_missing_backend.driver:Driver",
            install_hint="kvstore-llm[needy]",
        ),
        name="needy",
        source="dist",
    )
    with pytest.raises(DriverLoadError, match=r"pip install 'kvstore-llm\[needy\]'"):
        registry.get("needy").load()


def test_target_that_is_not_a_driver_is_loud() -> None:
    registry = DriverRegistry()
    registry.register(plugin("odd", target="kvstore.errors:KVStoreError"), name="odd", source="d")
    with pytest.raises(DriverLoadError, match="not a kvstore Driver"):
        registry.get("odd").load()


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(NotFoundError, match="cpu"):
        default_registry().get("nosuch")


def test_drivers_command_lists_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drivers"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "nvme" in out and "persistent" in out
