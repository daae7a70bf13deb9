# ngx_http_annotation_queue_module: build, run and test.
#
#   make          build build/ngx_http_annotation_queue_module.so
#   make run      PostgreSQL + demo data + nginx on 127.0.0.1:8080
#   make test     install what is missing, build, run the Test::Nginx suites
#   make test-mutants      deliberate faults in the module, each must fail a
#                          suite (scripts/mutants.sh; lists: src/*.mutants)
#   make coverage          line and branch coverage of the suites (gcov)
#   make test-exclusivity  the full exclusivity check under load
#   make test-repeat       make test's suites 20 times beside 2 CPU burners
#   make test-pgbouncer-new  prepared statements through PgBouncer 1.24 (built
#                          from Debian trixie's source) in transaction mode
#   make deb               build/deb/libnginx-mod-http-annotation-queue_<version>_<arch>.deb
#                          (dh-sequence-nginx, out of tree; scripts/build-deb.sh)
#   make test-deb          the .deb installed, used and removed on a
#                          debootstrapped bookworm (scripts/test-deb.sh, root)
#   make clean

SHELL        := /bin/bash
NGINX_SRC    ?= /usr/share/nginx/src
NGINX        ?= /usr/sbin/nginx
BUILD        := $(CURDIR)/build
MODULE       := $(BUILD)/ngx_http_annotation_queue_module.so
CC_OPT       ?= -g -O2 -fPIC -fstack-protector-strong -D_FORTIFY_SOURCE=2 \
                -Wall -Wextra -Wno-unused-parameter -Werror
LD_OPT       ?= -Wl,-z,relro -Wl,-z,now -fPIC
SOURCES      := config ngx_http_annotation_queue_module.c \
                $(wildcard src/*.c src/*.h)

.PHONY: all deps run test clean test-mutants coverage test-exclusivity \
        test-repeat test-pgbouncer-new deb test-deb

all: $(MODULE)

deps:
	@scripts/install-deps.sh

$(BUILD)/nginx/Makefile: config
	rm -rf $(BUILD)/nginx-src $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -r $(NGINX_SRC) $(BUILD)/nginx-src
	cd $(BUILD)/nginx-src && . ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt='$(CC_OPT)' --with-ld-opt='$(LD_OPT)' \
	        --add-dynamic-module=$(CURDIR) \
	        --builddir=$(BUILD)/nginx > $(BUILD)/configure.log \
	    || { cat $(BUILD)/configure.log; exit 1; }

$(MODULE): $(BUILD)/nginx/Makefile $(SOURCES)
	cd $(BUILD)/nginx-src && $(MAKE) -s -f $(BUILD)/nginx/Makefile modules
	cp $(BUILD)/nginx/ngx_http_annotation_queue_module.so $(MODULE).tmp
	mv -f $(MODULE).tmp $(MODULE)

run: deps $(MODULE)
	@scripts/run.sh

test: deps $(MODULE)
	@scripts/test.sh

test-mutants: deps
	@scripts/mutants.sh

coverage: deps
	@scripts/coverage.sh

test-exclusivity: deps $(MODULE)
	@scripts/exclusivity.sh

test-repeat: deps $(MODULE)
	@scripts/test-repeat.sh

test-pgbouncer-new: deps $(MODULE)
	@scripts/test-pgbouncer-new.sh

deb:
	@scripts/build-deb.sh

test-deb:
	@scripts/test-deb.sh

clean:
	rm -rf $(BUILD)

# benchmarks (make bench) and memory/fuzz checks (make fuzz, make test-asan,
# make test-valgrind) live beside their files
-include bench/bench.mk
-include fuzz/fuzz.mk
