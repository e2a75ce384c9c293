"""redis-keyspace-proxy: a RESP proxy that rewrites key namespaces and db indexes."""

__version__ = "0.1.0"
