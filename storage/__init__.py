"""Where bytes and rows live: blob stores (local directory, S3), SQLAlchemy models, the job
queue with every job and checkpoint state change, transactions, repository functions and the
local blob cache. No FastAPI; nothing here imports ``service``, ``worker``, ``runtime`` or
``cli``.

Modules: ``blobstore`` (BlobStore, LocalBlobStore, S3BlobStore), ``errors``,
``models``, ``db`` (make_engine, session_factory, write transactions), ``queue`` (state
changes), ``repo``, ``cache`` (BlobCache), ``gc``, ``scrub``.
"""
