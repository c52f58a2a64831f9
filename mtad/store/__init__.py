"""SQL store: tables, migrations, the database thread pool, repositories."""
