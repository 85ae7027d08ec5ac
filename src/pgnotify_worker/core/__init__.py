"""Pure logic: no I/O, no asyncpg/aiohttp/prometheus imports; unit-tested without a database."""
