"""``wifi-bridge sink analytics``: canonical logins into PostgreSQL or DuckDB tables.

Layers: :mod:`.rows` (pure mapping of records to rows), :mod:`.store` (the write algorithm over a
small SQL port), :mod:`.postgres` and :mod:`.duckdb_store` (the two adapters), :mod:`.service`
(the Kafka consumer shell), :mod:`.settings` and :mod:`.metrics`.
"""
