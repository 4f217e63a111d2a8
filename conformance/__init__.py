"""The kvstore conformance suite: base test classes every driver must pass."""
