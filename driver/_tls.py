"""The driver's TLS: the policy and client context shared with the node, in raftsql.tlsconfig
(stdlib ssl only). Re-exported here for the driver's modules."""

from raftsql.tlsconfig import (  # noqa: F401 - re-exported
    CA_CERT,
    DEFAULT_CLIENT,
    MIN_TLS_VERSION,
    TLS12_CIPHERS,
    InsecureKeyFileError,
    check_key_file,
    client_context,
    default_paths,
    harden,
)
