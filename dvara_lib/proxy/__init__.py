"""The data plane: clients, the acceptor, the workers and the relay."""
