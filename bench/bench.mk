# make bench: the claim endpoint against PostgreSQL's own limit (pgbench
# running the same statement).  Included by the top Makefile; see
# bench/README.md.  BENCH_QUICK=1 make bench for a short try.
#
# make bench-flat: claim latency with 10,000 to 10,000,000 items in a queue,
# and with many completed and expired items in the table, plus a sustained
# run without reset (bench/flat.sh; BENCH_FLAT_SIZES="10000 100000" for a
# short try).
#
# make bench-dirty: the claim in the states real queues reach (500,000 live
# claims above the head, 100,000 expired, 1,000,000 completed, priorities
# 0-9), made through the module, then 64 and 8 connections alternating for
# 10 minutes per queue without reset, against a clean queue (bench/dirty.sh;
# see its header for a short try).
#
# make bench-profile: where the claim statement's database time goes,
# against the minimal claim: pgbench rounds with pg_stat_statements, cut
# variants of the statement, EXPLAIN ANALYZE per CTE (bench/profile.sh).
#
# make bench-pgbouncer: claims through PgBouncer 1.18 (session and
# transaction modes) against direct connections (defaults, prepare off,
# statement_timeout local) at 8 and 64 connections (bench/pgbouncer.sh;
# BENCH_QUICK=1 for a short try).
#
# make bench-longpoll: long-polling claims: the latency from an enqueue to
# a waiter's answer, and what 10,000 waiters on one worker cost the worker
# and PostgreSQL while they wait (bench/longpoll.sh; BENCH_QUICK=1 for a
# short try).

.PHONY: bench bench-flat bench-dirty bench-profile bench-pgbouncer \
        bench-longpoll

bench: deps $(MODULE)
	@MODULE=$(MODULE) bench/run.sh

bench-flat: deps $(MODULE)
	@MODULE=$(MODULE) bench/flat.sh

bench-dirty: deps $(MODULE)
	@MODULE=$(MODULE) bench/dirty.sh

bench-profile: deps $(MODULE)
	@MODULE=$(MODULE) bench/profile.sh

bench-pgbouncer: deps $(MODULE)
	@MODULE=$(MODULE) bench/pgbouncer.sh

# make bench-citus: claims per second through the module on Citus (a
# coordinator and two workers on this machine) against plain PostgreSQL, at
# 8 and 64 connections, with each node's share of the CPU (bench/citus.sh;
# builds Citus when it is missing; BENCH_QUICK=1 for a short try).
.PHONY: bench-citus

bench-citus: deps $(MODULE)
	@MODULE=$(MODULE) bench/citus.sh

bench-longpoll: deps $(MODULE)
	@MODULE=$(MODULE) bench/longpoll.sh

# make bench-pair: the claim statement of BENCH_PAIR_BEFORE (a commit, HEAD
# by default) against the tree's, interleaved in one pgbench run on a queue
# of several priorities and live claims (bench/pair.sh; about a minute).
.PHONY: bench-pair

bench-pair: deps $(MODULE)
	@MODULE=$(MODULE) bench/pair.sh
