"""Security: SCRAM, the user file, TLS contexts, the proxy's own login.

# design:
# The pieces both sides need and nothing else: SCRAM (``scram``), the users clients log
# in as (``userfile``), TLS contexts built from the settings (``tls``), and the proxy's
# own account on the servers (``login``). The client-facing gate and the TLS handshake
# with clients live in the data plane (dvara_lib.proxy.gate, dvara_lib.proxy.clienttls).
"""
