"""An example third-party kvstore driver: values in a dict, in process.

It is the smallest complete driver: ``driver.py`` is the driver class and
``plugin.py`` the light module the ``kvstore.drivers`` entry point names.
"""
