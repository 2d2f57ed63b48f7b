"""dvara: a connection-pooling proxy for MongoDB replica sets."""

__version__ = "0.1.0"
