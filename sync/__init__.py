"""Wires encoders to PostgreSQL: specs, connections, sources, sink, queue, workers, bridge, CLI."""
