"""The data-ingest service: collectors submit batches of JSON lines; each batch is validated,
processed and stored durably, exactly once per batch id.

Modules: ``service`` (:class:`IngestService`, what clients call) and ``storage`` (the SQLite and
PostgreSQL stores behind it, chosen by the database URL's scheme).
"""

from .service import IngestService

__all__ = ["IngestService"]
