"""The node service: one store per host serving every local process (docs/node.md).

``kvstore node --config FILE`` runs ``NodeService``; processes use it as the
tier ``node://SOCKET`` (the ``node`` driver). Values move through a shared
memory arena; the Unix socket carries small msgpack control messages.
"""

from kvstore.node.access import default_socket_path

__all__ = ["default_socket_path"]
