"""Certificates and join tokens (protocol §4.2, §5).

``authority``  the CA and the hub's server certificate (load or create), CSR signing;
``token``      join tokens: issue, verify, refresh on a timer;
``tls``        TLS options for the hub's listeners and for edge clients;
``web``        the certificate server (``/ca.crt``, ``/edge.crt``, ``/nodeupgrade``, ``/readyz``);
``ratelimit``  the per-address failure budget the certificate server uses.
"""
