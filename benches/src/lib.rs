//! Criterion benchmarks for chorus; see `benches/` and `README.md` in this directory.
