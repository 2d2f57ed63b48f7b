"""The process: settings in, signals, restart, worker processes, the command line."""
