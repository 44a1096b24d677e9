"""Test harness shipped with the node, like numpy.testing: a local Orthanc PACS (`orthanc`), a
node process started from a config (`node`) and free loopback ports (`ports`). Used by the
tests, `make demo` and the benchmarks; never imported by the node's run-time code (an
import-linter contract checks it)."""
