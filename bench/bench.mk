# make bench: the claim endpoint against PostgreSQL's own limit (pgbench
# running the same statement).  Included by the top Makefile; see
# bench/README.md.  BENCH_QUICK=1 make bench for a short try.

.PHONY: bench

bench: deps $(MODULE)
	@MODULE=$(MODULE) bench/run.sh
