"""The link layer under Pipe and Endpoint: one way to listen, dial,
authenticate, introduce and open transport channels.

* :mod:`.net`: host identity, listening sockets, connecting with retry.
* :mod:`.accept`: :class:`Listener` (one accept loop: handshake deadline, cap
  on unauthenticated connections, EMFILE back-off) dispatching authenticated
  connections by *purpose* to registered handlers (:class:`Incoming`).
* :mod:`.dial`: :func:`dial` / :func:`introduce`, the connecting side.
* :mod:`.channels`: open a transport channel on one direction of a
  :class:`~aiokvpipe.transport.base.Link`.
* :mod:`.heartbeat`: liveness over a control connection.

A Pipe is a ring of ranks over these (:mod:`aiokvpipe.rendezvous` keeps the
rank table); an Endpoint is named peers over them.
"""

from __future__ import annotations

from .accept import Handler, Incoming, Listener
from .channels import open_both, open_receiver, open_sender
from .dial import Dialed, dial, introduce
from .net import host_identity

__all__ = [
    "Dialed",
    "Handler",
    "Incoming",
    "Listener",
    "dial",
    "host_identity",
    "introduce",
    "open_both",
    "open_receiver",
    "open_sender",
]
