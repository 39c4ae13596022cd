"""Code both sides use: domain types, wire conversion, adapter arithmetic, errors, RPC and metrics."""
