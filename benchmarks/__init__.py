"""lesionkit's benchmarks, each timed beside the baseline it replaces, in one run.

`harness` holds what they share (timing, the side-by-side table, the JSON line, device/threads/precision,
peak memory in a fresh process); one module per benchmark (`loader`, `aug`, `step`, `e2e`, `pack`,
`memory`) holds its cases and `bench(args) -> int`; `cli` is `lesionkit bench`.
"""
