# ngx_http_annotation_queue_module: build, run and test.
#
#   make          build build/ngx_http_annotation_queue_module.so
#   make NGINX_SRC=~/nginx-1.30.4 BUILD=$PWD/build/1.30.4
#                 the module for another nginx: a source tree of that exact
#                 version (Debian's nginx-dev tree by default, with its
#                 conf_flags; else ./configure --with-compat)
#   make install  copy the module into the modules directory of $(NGINX)
#                 (its nginx -V --modules-path), under DESTDIR if given
#   make test-matrix       the suites against nginx 1.22, 1.26 and the newest
#                          release (scripts/test-matrix.sh)
#   make run      PostgreSQL + demo data + nginx on 127.0.0.1:8080
#   make test     install what is missing, build, run the Test::Nginx suites
#   make test-topology     the suites of t/topology/: a real PgBouncer and a
#                          real streaming standby (CI runs them after make test)
#   make test-mutants      deliberate faults in the module, each must fail a
#                          suite (scripts/mutants.sh; lists: src/*.mutants)
#   make coverage          line and branch coverage of the suites (gcov)
#   make test-exclusivity  the full exclusivity check under load
#   make test-repeat       make test's suites 20 times beside 2 CPU burners
#   make test-pgbouncer-new  prepared statements through PgBouncer 1.24 (built
#                          from Debian trixie's source) in transaction mode
#   make test-citus        the suites of t/citus against a Citus coordinator
#                          and two workers on this machine (builds Citus
#                          13.2.2 from ../shared/vendor when it is missing;
#                          scripts/test-citus.sh)
#   make deb               build/deb/libnginx-mod-http-annotation-queue_<version>_<arch>.deb
#                          (dh-sequence-nginx, out of tree; scripts/build-deb.sh)
#   make test-deb          the .deb installed, used and removed on a
#                          debootstrapped bookworm (scripts/test-deb.sh, root)
#   make clean

SHELL        := /bin/bash
NGINX_SRC    ?= /usr/share/nginx/src
NGINX        ?= /usr/sbin/nginx
BUILD        := $(CURDIR)/build
DESTDIR      ?=
# Where $(NGINX) loads modules from: its --modules-path, else its
# <prefix>/modules, else nginx's default prefix's; without an $(NGINX) to
# ask, Debian's /usr/lib/nginx/modules.
NGINX_V       = $(shell command -v $(NGINX) >/dev/null && $(NGINX) -V 2>&1)
MODULES_PATH ?= $(if $(filter configure,$(NGINX_V)),$(or \
                  $(patsubst --modules-path=%,%,$(filter --modules-path=%,$(NGINX_V))),\
                  $(patsubst --prefix=%,%/modules,$(filter --prefix=%,$(NGINX_V))),\
                  /usr/local/nginx/modules),/usr/lib/nginx/modules)
MODULE       := $(BUILD)/ngx_http_annotation_queue_module.so
CC_OPT       ?= -g -O2 -fPIC -fstack-protector-strong -D_FORTIFY_SOURCE=2 \
                -Wall -Wextra -Wno-unused-parameter -Werror
LD_OPT       ?= -Wl,-z,relro -Wl,-z,now -fPIC
SOURCES      := config ngx_http_annotation_queue_module.c \
                $(wildcard src/*.c src/*.h)

.PHONY: all deps run test clean test-mutants coverage test-exclusivity \
        test-repeat test-pgbouncer-new test-citus deb test-deb test-topology install test-matrix FORCE

all: $(MODULE)

deps:
	@scripts/install-deps.sh

# Which nginx tree build/ was configured with: another NGINX_SRC configures
# again.
$(BUILD)/nginx-src.path: FORCE
	@mkdir -p $(BUILD)
	@echo '$(abspath $(NGINX_SRC))' | cmp -s - $@ \
	    || echo '$(abspath $(NGINX_SRC))' > $@

# Debian's tree (nginx-dev) carries the flags of Debian's nginx in
# conf_flags; any other tree (a release tarball, or the repository with
# auto/configure) gets --with-compat alone.
$(BUILD)/nginx/Makefile: config $(BUILD)/nginx-src.path
	rm -rf $(BUILD)/nginx-src $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -r $(NGINX_SRC) $(BUILD)/nginx-src
	cd $(BUILD)/nginx-src && \
	    if [ -f conf_flags ]; then . ./conf_flags; \
	    else NGX_CONF_FLAGS=(--with-compat); fi && \
	    if [ -x configure ]; then cfg=./configure; \
	    else cfg=auto/configure; fi && \
	    $$cfg "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt='$(CC_OPT)' --with-ld-opt='$(LD_OPT)' \
	        --add-dynamic-module=$(CURDIR) \
	        --builddir=$(BUILD)/nginx > $(BUILD)/configure.log \
	    || { cat $(BUILD)/configure.log; exit 1; }

$(MODULE): $(BUILD)/nginx/Makefile $(SOURCES)
	cd $(BUILD)/nginx-src && $(MAKE) -s -f $(BUILD)/nginx/Makefile modules
	cp $(BUILD)/nginx/ngx_http_annotation_queue_module.so $(MODULE).tmp
	mv -f $(MODULE).tmp $(MODULE)

# The module loads only into the nginx version it was built for: refuse to
# install it beside another.
install: $(MODULE)
	@built=$$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' \
	          $(BUILD)/nginx-src/src/core/nginx.h); \
	 have=$$($(NGINX) -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p'); \
	 if [ -n "$$have" ] && [ "$$built" != "$$have" ]; then \
	     echo "make install: the module is built for nginx $$built," \
	          "$(NGINX) is $$have (make NGINX_SRC=<nginx-$$have tree>)" >&2; \
	     exit 1; \
	 fi
	install -d $(DESTDIR)$(MODULES_PATH)
	install -m 644 $(MODULE) $(DESTDIR)$(MODULES_PATH)/

test-matrix: deps
	@scripts/test-matrix.sh

run: deps $(MODULE)
	@scripts/run.sh

test: deps $(MODULE)
	@scripts/test.sh

test-topology: deps $(MODULE)
	@scripts/test.sh t/topology/*.t

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

test-citus: deps $(MODULE)
	@scripts/test-citus.sh

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
