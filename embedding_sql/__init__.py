"""SQL and ORM access to the vectors: SQL functions (installed by the migrations) and the
SQLAlchemy / psycopg integration. Knows nothing of workers."""
