"""TLS for the SMTP server: the server context, reloadable, and what the payload shows.

The context is built from ``[smtp.tls]`` once at start, so a missing or
broken certificate stops ``trismtp serve`` with a one-line error naming the
key (exit 2), and again on SIGHUP (:meth:`ServerTls.reload`): new handshakes
use the new certificate, sessions already encrypted keep theirs, and a reload
that fails keeps the old context and says why in the log, so renewing a
certificate never takes the listener down.
"""

from __future__ import annotations

import logging
import os
import ssl

import trio

from trismtp.settings import ConfigError, TlsSettings

__all__ = ["ServerTls", "session_tls"]

log = logging.getLogger("trismtp.smtp")


class ServerTls:
    """The server's current :class:`ssl.SSLContext` for ``[smtp.tls]``."""

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        self.context = _build(settings)

    def reload(self) -> bool:
        """Read the certificate and key again; False (and a log line) if that failed."""
        try:
            self.context = _build(self._settings)
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self._settings.certificate)
        return True

    def wrap(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        """A server-side TLS stream over ``stream``; the handshake is still to do."""
        return trio.SSLStream(stream, self.context, server_side=True)


def session_tls(stream: trio.SSLStream[trio.abc.Stream]) -> dict[str, str]:
    """The payload's ``tls``: protocol version and cipher suite of a finished handshake."""
    cipher = stream.cipher()
    return {
        "version": str(stream.version()),
        "cipher": cipher[0] if cipher else "",
    }


def _build(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    # AEAD suites only for TLS 1.2 (settings.DEFAULT_TLS_CIPHERS says why);
    # the string was checked when the settings were loaded.
    context.set_ciphers(settings.ciphers)
    # No session tickets to rotate, and no state shared between processes.
    context.options |= ssl.OP_NO_TICKET
    # load_cert_chain's OSErrors do not say which file they are about.
    for key, path in (
        ("smtp.tls.certificate", settings.certificate),
        ("smtp.tls.key", settings.key),
    ):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: {path!r} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path!r} is not readable")
    try:
        context.load_cert_chain(settings.certificate, settings.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"smtp.tls.certificate/smtp.tls.key: {settings.certificate!r} and {settings.key!r} "
            f"are not a PEM certificate chain and its private key ({exc})"
        ) from None
    return context
