"""The servers behind dvara: pooled connections, the topology, discovery."""
