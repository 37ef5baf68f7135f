"""Open a hookflow attempt archive with pyarrow and DuckDB, as they are, and print counts.

Usage: python3 scripts/check_archive.py ARCHIVE_DIR

Prints one line, `rows=N outcomes=outcome:count,...`, identical for both readers, or exits
non-zero naming the reader that failed. The pipeline tests call it to prove the files are
readable by tools other than the Rust parquet crate.
"""

import sys

import duckdb
import pyarrow.dataset as ds


def main() -> int:
    archive = sys.argv[1]

    table = ds.dataset(archive, format="parquet", partitioning="hive").to_table()
    arrow_counts = {}
    for outcome in table.column("outcome").to_pylist():
        arrow_counts[outcome] = arrow_counts.get(outcome, 0) + 1

    rows = duckdb.sql(
        f"SELECT outcome, count(*) FROM read_parquet('{archive}/**/*.parquet', hive_partitioning = true) "
        "GROUP BY outcome"
    ).fetchall()
    duck_counts = {outcome: count for outcome, count in rows}

    if arrow_counts != duck_counts:
        print(f"pyarrow and DuckDB disagree: {arrow_counts} vs {duck_counts}", file=sys.stderr)
        return 1
    summary = ",".join(f"{k}:{v}" for k, v in sorted(arrow_counts.items()))
    print(f"rows={table.num_rows} outcomes={summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
