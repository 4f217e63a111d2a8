"""The drivers shipped with kvstore, one package per driver.

Each package's ``__init__`` is a light pluggy plugin registered through the
``kvstore.drivers`` entry points, exactly as a third-party driver would be.
"""
