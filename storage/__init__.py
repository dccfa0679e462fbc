"""Where bytes and rows live: blob stores (local directory, S3), SQLAlchemy models, the job
queue and repository functions. No FastAPI; nothing here imports ``service`` or ``worker``.

Modules: ``blobstore`` (BlobStore, LocalBlobStore, S3BlobStore), ``errors``,
``models``, ``db`` (make_engine, session_factory, migrate), ``queue``, ``repo``, ``gc``.
"""
