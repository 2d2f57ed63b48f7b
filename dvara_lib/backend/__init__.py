"""The servers behind dvara: pooled connections, the topology, discovery.

# design:
# One ``Backend`` (``connect``) opens every connection dvara makes to a server: TCP,
# TLS, handshake, the proxy's own login. ``pool`` lends them one request at a time;
# ``topology`` holds what each member last said; ``discovery`` keeps it current from a
# thread of its own; ``membership`` maps members to stable proxy ports. It uses
# dvara_lib.security for logins and TLS contexts and knows nothing of clients.
"""
