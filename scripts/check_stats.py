"""Compute `hookflow stats` figures with DuckDB and pyarrow, for the test that compares them.

Usage: python3 scripts/check_stats.py ARCHIVE_DIR

Prints one JSON object keyed by endpoint id, each with deliveries, delivered, attempts,
failures, first_failure_ms, last_failure_ms and error_kinds (kind -> rows), computed with
DuckDB, after checking that pyarrow counts the same deliveries per endpoint. The queries are
the ones the README shows.
"""

import json
import sys

import duckdb
import pyarrow.compute as pc
import pyarrow.dataset as ds


def main() -> int:
    archive = sys.argv[1]
    source = f"read_parquet('{archive}/**/*.parquet', hive_partitioning = true)"

    rows = duckdb.sql(
        f"""
        SELECT endpoint_id,
               count(*) FILTER (WHERE outcome <> 'failed')            AS deliveries,
               count(*) FILTER (WHERE outcome = 'delivered')           AS delivered,
               count(*) FILTER (WHERE started_at IS NOT NULL)          AS attempts,
               count(*) FILTER (WHERE outcome IN ('failed', 'dead_lettered', 'expired')) AS failures,
               epoch_ms(min(finished_at) FILTER (WHERE outcome IN ('failed', 'dead_lettered', 'expired'))) AS first_failure_ms,
               epoch_ms(max(finished_at) FILTER (WHERE outcome IN ('failed', 'dead_lettered', 'expired'))) AS last_failure_ms
        FROM {source}
        WHERE endpoint_id IS NOT NULL
        GROUP BY endpoint_id ORDER BY endpoint_id
        """
    ).fetchall()
    result = {}
    for endpoint, deliveries, delivered, attempts, failures, first, last in rows:
        result[endpoint] = {
            "deliveries": deliveries,
            "delivered": delivered,
            "attempts": attempts,
            "failures": failures,
            "first_failure_ms": first,
            "last_failure_ms": last,
            "error_kinds": {},
        }
    for endpoint, kind, count in duckdb.sql(
        f"SELECT endpoint_id, error_kind, count(*) FROM {source} "
        "WHERE endpoint_id IS NOT NULL AND error_kind IS NOT NULL GROUP BY ALL"
    ).fetchall():
        result[endpoint]["error_kinds"][kind] = count

    table = ds.dataset(archive, format="parquet", partitioning="hive").to_table()
    final = table.filter(pc.and_(pc.is_valid(table["endpoint_id"]), pc.not_equal(table["outcome"], "failed")))
    arrow_deliveries = {}
    for endpoint in final.column("endpoint_id").to_pylist():
        arrow_deliveries[endpoint] = arrow_deliveries.get(endpoint, 0) + 1
    duck_deliveries = {e: v["deliveries"] for e, v in result.items() if v["deliveries"]}
    if arrow_deliveries != duck_deliveries:
        print(f"pyarrow and DuckDB disagree: {arrow_deliveries} vs {duck_deliveries}", file=sys.stderr)
        return 1

    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
