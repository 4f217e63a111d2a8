"""Driver discovery: pluggy hooks fed by the ``kvstore.drivers`` entry points.

Each entry point names a light plugin module (its name is the URL scheme)
whose ``kvstore_driver`` hook describes one driver. The driver class itself
is imported only when a URL of that scheme is opened, so a missing optional
dependency costs nothing until it is used, and then fails loudly with the
command that installs it. kvstore's own drivers register through the same
entry points as anyone else's; two plugins claiming one scheme is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from kvstore.config_url import DriverConfig, url_scheme
from kvstore.driver import Driver
from kvstore.errors import DriverLoadError, NotFoundError

ENTRY_POINT_GROUP = "kvstore.drivers"
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")

hookspec = pluggy.HookspecMarker("kvstore")
hookimpl = pluggy.HookimplMarker("kvstore")


@dataclass(frozen=True)
class DriverInfo:
    """What a plugin says about its driver.

    scheme: the URL scheme, equal to the entry point's name.
    target: ``"package.module:ClassName"`` of the Driver subclass, imported lazily.
    summary: one line for ``kvstore drivers``.
    install_hint: what to install when ``target`` fails to import
        (``"kvstore-llm[redis]"``); ``None`` when it needs nothing extra.
    """

    scheme: str
    target: str
    summary: str
    install_hint: str | None = None


class DriverHookspecs:
    """The hooks a driver plugin implements."""

    @hookspec(firstresult=False)
    def kvstore_driver(self) -> DriverInfo:  # type: ignore[empty-body]
        """Describe the driver this plugin provides."""


@dataclass(frozen=True)
class RegisteredDriver:
    """A driver known to the registry and where it came from."""

    info: DriverInfo
    source: str

    def load(self) -> type[Driver[Any]]:
        """Import the driver class, or raise DriverLoadError with an install hint."""
        module_name, _, class_name = self.info.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = (
                f"; install it with: pip install '{self.info.install_hint}'"
                if self.info.install_hint
                else ""
            )
            raise DriverLoadError(
                f"driver {self.info.scheme!r} could not be imported ({exc}){hint}",
                driver=self.info.scheme,
            ) from exc
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise DriverLoadError(
                f"{self.info.target} (from {self.source}) is not a kvstore Driver subclass",
                driver=self.info.scheme,
            )
        return cls


class DriverRegistry:
    """Schemes to drivers, filled from plugins registered on a pluggy manager."""

    def __init__(self) -> None:
        self._manager = pluggy.PluginManager("kvstore")
        self._manager.add_hookspecs(DriverHookspecs)
        self._drivers: dict[str, RegisteredDriver] = {}

    def register(self, plugin: object, *, name: str, source: str) -> RegisteredDriver:
        """Register a plugin object or module whose scheme must equal ``name``."""
        if name in self._drivers:
            raise DriverLoadError(
                f"driver scheme {name!r} is registered twice: by "
                f"{self._drivers[name].source} and by {source}; uninstall one of them",
                driver=name,
            )
        claimed = self._manager.get_name(plugin)
        if claimed is not None:
            raise DriverLoadError(
                f"plugin {name!r} from {source} is the object that already registers scheme "
                f"{claimed!r}: a plugin module or object describes one scheme; give each "
                "scheme its own plugin object (docs/driver-author-guide.md, several schemes)",
                driver=name,
            )
        try:
            self._manager.register(plugin, name=name)
        except ValueError as exc:
            raise DriverLoadError(f"plugin {name!r} from {source}: {exc}", driver=name) from exc
        hook = self._manager.subset_hook_caller(
            "kvstore_driver",
            [p for p in self._manager.get_plugins() if p is not plugin],
        )
        infos = hook()
        if len(infos) != 1 or not isinstance(infos[0], DriverInfo):
            self._manager.unregister(plugin)
            raise DriverLoadError(
                f"plugin {name!r} from {source} must implement kvstore_driver() "
                "returning one DriverInfo",
                driver=name,
            )
        info = infos[0]
        if info.scheme != name or not _SCHEME.match(name):
            self._manager.unregister(plugin)
            raise DriverLoadError(
                f"plugin {name!r} from {source} declares scheme {info.scheme!r}; the entry "
                "point name and the scheme must be equal and lowercase",
                driver=name,
            )
        registered = RegisteredDriver(info=info, source=source)
        self._drivers[name] = registered
        return registered

    def load_entry_points(self) -> None:
        """Register every plugin in the ``kvstore.drivers`` entry-point group."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            source = f"{dist.metadata['Name']} {dist.version}" if dist else ep.value
            try:
                plugin = ep.load()
            except Exception as exc:
                raise DriverLoadError(
                    f"driver plugin {ep.name!r} ({ep.value}) from {source} failed to import: "
                    f"{exc}; reinstall or uninstall {source}",
                    driver=ep.name,
                ) from exc
            self.register(plugin, name=ep.name, source=source)

    def get(self, scheme: str) -> RegisteredDriver:
        """The driver of ``scheme``; ``family+variant`` schemes (``fsspec+s3``)
        fall back to the family's driver when no driver claims the whole name."""
        family = scheme.split("+", 1)[0]
        try:
            return self._drivers[scheme if scheme in self._drivers else family]
        except KeyError:
            known = ", ".join(sorted(self._drivers)) or "none"
            raise NotFoundError(
                f"no driver for scheme {scheme!r} (registered: {known})", driver=scheme
            ) from None

    def drivers(self) -> list[RegisteredDriver]:
        return [self._drivers[name] for name in sorted(self._drivers)]

    def parse_url(self, url: str) -> DriverConfig:
        """The typed config a URL describes."""
        cls = self.get(url_scheme(url)).load()
        return cls.config_type.from_url(url)

    async def open(self, target: str | DriverConfig) -> Driver[Any]:
        """Open the driver a URL or config names."""
        config = self.parse_url(target) if isinstance(target, str) else target
        cls = self.get(config.scheme).load()
        return await cls.open(config)


_default: DriverRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> DriverRegistry:
    """The process-wide registry, filled from entry points on first use."""
    global _default
    with _default_lock:
        if _default is None:
            registry = DriverRegistry()
            registry.load_entry_points()
            _default = registry
        return _default


def parse_url(url: str) -> DriverConfig:
    """The typed config of a driver URL, via the default registry."""
    return default_registry().parse_url(url)


async def open_driver(target: str | DriverConfig) -> Driver[Any]:
    """Open a driver from a URL or config, via the default registry."""
    return await default_registry().open(target)
