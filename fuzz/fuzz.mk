# Memory and input checks, included by the top Makefile.
#
#   make fuzz            build the libFuzzer targets (clang, ASan + UBSan) and
#                        run each for a bounded time; FUZZ_SECONDS (default
#                        80) is the total, shared evenly by the targets;
#                        FUZZ_TARGETS="key claim" to run some of them
#   make fuzz-seeds      replay the seed corpus (fuzz/corpus/) once, no fuzzing
#   make test-asan       the Test::Nginx suites against the module built with
#                        -fsanitize=address,undefined (build/asan/)
#   make test-valgrind   the Test::Nginx suites with nginx under valgrind
#
# Reports: build/fuzz/logs/, build/asan/reports/, build/valgrind/reports/.

# The fuzz targets and the ASan module use their own copy of nginx's source
# tree, configured in build/asan/ (never build/nginx*: another make may be
# configuring those at the same time).
ASAN_BUILD    := $(BUILD)/asan
ASAN_MODULE   := $(ASAN_BUILD)/ngx_http_annotation_queue_module.so
ASAN_CC_OPT   ?= -g -O1 -fno-omit-frame-pointer -fPIC \
                 -fsanitize=address,undefined -U_FORTIFY_SOURCE \
                 -Wall -Wextra -Wno-unused-parameter -Werror
ASAN_LD_OPT   ?= -fsanitize=address,undefined -Wl,-z,relro -Wl,-z,now -fPIC

FUZZ_CC       ?= clang-14
FUZZ_SECONDS  ?= 80
FUZZ_TARGETS  ?= key claim item uuid
FUZZ_BUILD    := $(BUILD)/fuzz
FUZZ_NGX      := $(ASAN_BUILD)/nginx-src/src
FUZZ_INCS     := -I$(CURDIR)/fuzz -I$(CURDIR)/src \
                 $(addprefix -I$(FUZZ_NGX)/,core event event/modules os/unix \
                                            http http/modules http/v2) \
                 -I$(ASAN_BUILD)/nginx \
                 -I$(shell pg_config --includedir 2>/dev/null \
                           || echo /usr/include/postgresql)
FUZZ_CFLAGS   := -g -O1 -fno-omit-frame-pointer \
                 -fsanitize=fuzzer,address,undefined \
                 -fno-sanitize-recover=all \
                 -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare
FUZZ_LIBS     := -ljansson -lcrypto
# the module's own files that parse untrusted bytes (compiled as they are),
# and the errors they answer with
FUZZ_MODULE   := src/ngx_aq_key.c src/ngx_aq_json.c src/ngx_aq_errors.c
FUZZ_OBJS     := $(patsubst src/%.c,$(FUZZ_BUILD)/obj/%.o,$(FUZZ_MODULE)) \
                 $(FUZZ_BUILD)/obj/fuzz_ngx.o
FUZZ_BINS     := $(addprefix $(FUZZ_BUILD)/fuzz_,$(FUZZ_TARGETS))
FUZZ_HEADERS  := src/ngx_aq.h src/ngx_aq_outcomes.h fuzz/fuzz_ngx.h \
                 $(ASAN_BUILD)/nginx/Makefile

# libFuzzer options per target: the largest input (twice the default body
# limit for the JSON targets; fuzz-seeds replays longer seeds whole), the
# dictionary
FUZZ_MAXLEN_key   := 8192
FUZZ_MAXLEN_json  := 8192
FUZZ_MAXLEN_uuid  := 128
FUZZ_DICT_key     := fuzz/key.dict
FUZZ_DICT_json    := fuzz/json.dict
FUZZ_DICT_uuid    := fuzz/uuid.dict

.PHONY: fuzz fuzz-build fuzz-seeds fuzz-cc asan test-asan test-valgrind

# nginx configured as the top Makefile does, with the sanitizers; the
# features it finds must be those of the normal build (same ABI): configure's
# test programs run without LeakSanitizer, and ngx_auto_config.h is compared.
$(ASAN_BUILD)/nginx/Makefile: config
	rm -rf $(ASAN_BUILD)/nginx-src $(ASAN_BUILD)/nginx
	mkdir -p $(ASAN_BUILD)
	cp -r $(NGINX_SRC) $(ASAN_BUILD)/nginx-src
	cd $(ASAN_BUILD)/nginx-src && . ./conf_flags && \
	    ASAN_OPTIONS=detect_leaks=0 ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt='$(ASAN_CC_OPT)' --with-ld-opt='$(ASAN_LD_OPT)' \
	        --add-dynamic-module=$(CURDIR) \
	        --builddir=$(ASAN_BUILD)/nginx > $(ASAN_BUILD)/configure.log \
	    || { cat $(ASAN_BUILD)/configure.log; exit 1; }
	@if [ -f $(BUILD)/nginx/ngx_auto_config.h ] \
	    && ! diff <(grep -v NGX_CONFIGURE $(BUILD)/nginx/ngx_auto_config.h) \
	              <(grep -v NGX_CONFIGURE $(ASAN_BUILD)/nginx/ngx_auto_config.h); \
	then \
	    echo "fuzz.mk: the sanitizer configure found other features than" \
	         "build/nginx (above): not the same ABI" >&2; \
	    rm -f $@; exit 1; \
	fi

asan: $(ASAN_MODULE)

$(ASAN_MODULE): $(ASAN_BUILD)/nginx/Makefile $(SOURCES)
	cd $(ASAN_BUILD)/nginx-src && \
	    $(MAKE) -s -f $(ASAN_BUILD)/nginx/Makefile modules
	cp $(ASAN_BUILD)/nginx/ngx_http_annotation_queue_module.so $@.tmp
	mv -f $@.tmp $@

# the objects are kept between runs
.SECONDARY: $(FUZZ_OBJS) $(patsubst %,$(FUZZ_BUILD)/obj/fuzz_%.o,$(FUZZ_TARGETS))

fuzz-build: $(FUZZ_BINS)

# clang and its libFuzzer runtime, installed like the other dependencies
fuzz-cc:
	@command -v $(FUZZ_CC) >/dev/null \
	    && [ -n "$$(ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ] \
	    || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
	         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	                clang-14 libclang-rt-14-dev >/dev/null; } \
	    || { echo "fuzz.mk: $(FUZZ_CC) with libFuzzer is missing:" \
	              "apt-get install clang-14 libclang-rt-14-dev" >&2; exit 1; }

$(FUZZ_BUILD)/obj/%.o: src/%.c $(FUZZ_HEADERS) | fuzz-cc
	@mkdir -p $(FUZZ_BUILD)/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_INCS) -c $< -o $@

$(FUZZ_BUILD)/obj/%.o: fuzz/%.c $(FUZZ_HEADERS) | fuzz-cc
	@mkdir -p $(FUZZ_BUILD)/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_INCS) -c $< -o $@

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/fuzz_%.o $(FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $^ $(FUZZ_LIBS) -o $@

# What a failed run printed that matters: the broken invariant or the
# sanitizer's report (first lines), and where the input was saved.
FUZZ_EXCERPT  := awk '/INVARIANT BROKEN/ { inv = 1; n = 2 } \
                      !inv && /ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:/ { n = 14 } \
                      n > 0 { print "      " $$0; n-- } \
                      /Test unit written/ { print "      " $$0 }'

# Each target: its seeds (fuzz/corpus/<target>, read only) and what it found
# before (build/fuzz/corpus/<target>), for FUZZ_SECONDS / number of targets.
# A crash, a sanitizer report or a broken invariant fails the target; its
# input is kept in build/fuzz/artifacts/, its log in build/fuzz/logs/.
fuzz: deps fuzz-build
	@n=$(words $(FUZZ_TARGETS)); secs=$$(( $(FUZZ_SECONDS) / n )); \
	[ "$$secs" -ge 1 ] || secs=1; failed=; \
	mkdir -p $(FUZZ_BUILD)/logs $(FUZZ_BUILD)/artifacts; \
	for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	    log=$(FUZZ_BUILD)/logs/$$t.log; \
	    case $$t in \
	        key)        maxlen=$(FUZZ_MAXLEN_key);  dict=$(FUZZ_DICT_key);; \
	        claim|item) maxlen=$(FUZZ_MAXLEN_json); dict=$(FUZZ_DICT_json);; \
	        *)          maxlen=$(FUZZ_MAXLEN_uuid); dict=$(FUZZ_DICT_uuid);; \
	    esac; \
	    echo "fuzz: $$t for $${secs}s (log: $$log)"; \
	    if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	       $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$$secs -timeout=10 \
	           -rss_limit_mb=2048 -print_final_stats=1 -max_len=$$maxlen \
	           -dict=$$dict -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t- \
	           $(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t > $$log 2>&1; \
	    then \
	        awk '/^stat::number_of_executed_units/ { r = $$2 } \
	             /^stat::new_units_added/ { u = $$2 } \
	             / cov: / { c = $$0; sub(/.* cov: /, "", c); sub(/ .*/, "", c) } \
	             END { printf "      ok: %s runs, coverage %s edges, %s new inputs\n", r, c, u }' $$log; \
	    else \
	        failed="$$failed $$t"; \
	        echo "fuzz: $$t FAILED:"; \
	        $(FUZZ_EXCERPT) $$log; \
	    fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: failed:$$failed"; exit 1; fi; \
	echo "fuzz: all targets passed ($(FUZZ_TARGETS))"

# The seeds alone, once each: quick, deterministic (regressions).
fuzz-seeds: deps fuzz-build
	@failed=; mkdir -p $(FUZZ_BUILD)/logs $(FUZZ_BUILD)/artifacts; \
	for t in $(FUZZ_TARGETS); do \
	    log=$(FUZZ_BUILD)/logs/$$t-seeds.log; \
	    if $(FUZZ_BUILD)/fuzz_$$t -runs=0 \
	           -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t- \
	           fuzz/corpus/$$t > $$log 2>&1; then \
	        echo "fuzz-seeds: $$t: $$(ls fuzz/corpus/$$t | wc -l) seeds pass"; \
	    else \
	        failed="$$failed $$t"; \
	        echo "fuzz-seeds: $$t FAILED:"; \
	        $(FUZZ_EXCERPT) $$log; \
	    fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz-seeds: failed:$$failed"; exit 1; fi

test-asan: deps $(ASAN_MODULE)
	@scripts/test-asan.sh

test-valgrind: deps $(MODULE)
	@scripts/test-valgrind.sh
