"""Drives northstar's Postgres wire with the clients analysts use: psycopg 3, SQLAlchemy and
pandas. Prints one JSON object of what each saw; tests/pg_wire.rs checks it.

Usage: pg_clients.py HOST:PORT ANALYST_KEY ADMIN_KEY MAX_SESSIONS
"""

import datetime
import json
import sys
import threading
import time

import pandas
import psycopg
import sqlalchemy

addr, analyst_key, admin_key, max_sessions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
host, port = addr.rsplit(":", 1)


def url(key, driver="postgresql"):
    return f"{driver}://northstar:{key}@{host}:{port}/northstar"


def failure(run):
    """The SQLSTATE and message of what `run` raised, or None."""
    try:
        run()
    except psycopg.Error as error:
        return {"sqlstate": error.sqlstate, "message": str(error)}
    except sqlalchemy.exc.DBAPIError as error:
        return {"sqlstate": error.orig.sqlstate, "message": str(error.orig)}
    return None


seen = {}
since = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)

with psycopg.connect(url(analyst_key), autocommit=True) as conn:
    seen["tables"] = [
        row[0]
        for row in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' ORDER BY table_name"
        )
    ]
    # Grafana's query builder lists tables and columns, and finds time columns by their type.
    seen["columns"] = {
        name: kind
        for name, kind in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
            ("events",),
        )
    }
    # What DBeaver and JDBC (Metabase) ask at connect and to list schemas and tables.
    seen["catalog_queries"] = [
        conn.execute(query).fetchall() is not None
        for query in (
            "SELECT version()",
            "SELECT current_schema(), session_user",
            "SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace n ORDER BY n.nspname",
            "SELECT c.relname, c.relkind FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v') ORDER BY c.relname",
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) "
            "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "WHERE c.relname = 'events' AND a.attnum > 0 ORDER BY a.attnum",
            "SHOW search_path",
        )
    ]
    # A prepared statement with parameters (psycopg binds them on the server), used twice.
    query = (
        "SELECT count(*) FROM events WHERE timestamp >= %s AND timestamp < %s AND event = %s"
    )
    until = datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)
    seen["prepared"] = [
        conn.execute(query, (since, until, event), prepare=True).fetchone()[0]
        for event in ("api_call_made", "no_such_event")
    ]
    seen["decimal"] = str(
        conn.execute("SELECT CAST('12345678901234567.1234567891' AS DECIMAL(38,10))").fetchone()[0]
    )
    seen["timestamptz"] = conn.execute("SELECT max(timestamp) FROM events").fetchone()[0].isoformat()
    # 100,000 rows streamed, at the row bound; one more is refused.
    with conn.cursor() as cur:
        cur.execute("SELECT value FROM generate_series(1, 100000)")
        seen["streamed"] = sum(1 for _ in cur)
    seen["over_rows"] = failure(
        lambda: conn.execute("SELECT value FROM generate_series(1, 100001)").fetchall()
    )
    seen["refused"] = failure(lambda: conn.execute("DELETE FROM events"))
    seen["refused_setting"] = failure(
        lambda: conn.execute("SET datafusion.execution.batch_size = 1")
    )
    seen["timeout"] = failure(
        lambda: conn.execute("SELECT count(*) FROM generate_series(1, 100000000000)").fetchall()
    )
    # A cancel request from another thread stops the running statement.
    threading.Timer(0.5, conn.cancel).start()
    seen["cancelled"] = failure(
        lambda: conn.execute("SELECT count(*) FROM generate_series(1, 100000000000)").fetchall()
    )
    seen["after_cancel"] = conn.execute("SELECT 1").fetchone()[0]

seen["admin_login"] = psycopg.connect(url(admin_key)).execute("SELECT 2").fetchone()[0]
seen["wrong_password"] = failure(lambda: psycopg.connect(url("not-a-key-at-all")))

# The session bound: all sessions open, one more is refused; a closed one frees its place.
open_sessions = [psycopg.connect(url(analyst_key)) for _ in range(max_sessions)]
seen["over_sessions"] = failure(lambda: psycopg.connect(url(analyst_key)))
open_sessions.pop().close()
deadline = time.monotonic() + 30
while True:
    try:
        seen["after_close"] = psycopg.connect(url(analyst_key)).execute("SELECT 3").fetchone()[0]
        break
    except psycopg.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
for session in open_sessions:
    session.close()

engine = sqlalchemy.create_engine(url(analyst_key, "postgresql+psycopg"))
inspector = sqlalchemy.inspect(engine)
seen["sqlalchemy_tables"] = sorted(inspector.get_table_names())
frame = pandas.read_sql(
    sqlalchemy.text(
        "SELECT event, count(*) AS n FROM events WHERE timestamp >= :since "
        "GROUP BY event ORDER BY event"
    ),
    engine,
    params={"since": since},
)
seen["pandas"] = {str(row.event): int(row.n) for row in frame.itertuples()}

print(json.dumps(seen))
