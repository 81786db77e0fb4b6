"""trismtp: an SMTP-to-jobs daemon on Trio.

Every message accepted over SMTP becomes one durable job in a jobs service,
delivered over a WebSocket JSON-RPC connection. See ``docs/`` for the design.
"""

__version__ = "0.1.0"
