"""The one way to the database: the pool and the named queries of sql/*.sql (db), and a
store per concept on top of it (ledger, tracking, suppressions, reports, the console's reads),
plus the migrations that build the schema. It knows the core, nothing above."""
