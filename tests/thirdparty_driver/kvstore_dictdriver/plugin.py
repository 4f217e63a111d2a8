"""The ``dictkv`` plugin: tells kvstore where the driver class lives.

Keep this module light; kvstore imports the driver class only when a
``dictkv://`` URL is opened.
"""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="dictkv",
        target="kvstore_dictdriver.driver:DictDriver",
        summary="values in a Python dict, in process (an example driver)",
    )
