"""One TLS connection to one node, in raftsql.clientconn (shared with the node, which uses it
to join a cluster). Re-exported here for the driver's modules."""

from raftsql.clientconn import DSN, ConnectionLost, NodeConnection, NodeUnreachable  # noqa: F401
