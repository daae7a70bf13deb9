#!/usr/bin/env bash
# Builds an nginx and the module against it from one nginx source tree,
# everything under the output directory (never the system's nginx).
#
#   scripts/build-nginx.sh SRC OUT
#
# SRC is an nginx source tree: a release tarball's (./configure) or the
# repository's (auto/configure).  One configure run builds both, so the
# binary and the module share their version and compatibility signature:
#
#   OUT/objs/nginx                                  the nginx binary
#   OUT/objs/ngx_http_annotation_queue_module.so    the module for it
#   OUT/prefix/                                     its prefix (unused by t/,
#                                                   which passes -p)
#   OUT/configure.log, OUT/make.log
#
# The static modules are those of Debian's nginx (conf_flags of nginx-dev:
# ssl, v2, stub_status, realip, auth_request, dav, slice, threads, debug,
# pcre-jit) and the other static http modules of its nginx -V, with
# --with-compat.  The module is compiled as the Makefile compiles it (-Wall
# -Wextra -Werror), so a warning that a newer nginx's headers raise fails
# the build here.
#
# Idempotent: configure runs again only when its arguments or the module's
# config file changed (OUT/configure.stamp); make rebuilds what changed.
# SRC's own Makefile is written by configure: one OUT per SRC.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC OUT" >&2
    exit 2
fi

top=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)

if [ -x "$src/configure" ]; then
    configure=./configure
elif [ -f "$src/auto/configure" ]; then
    configure=auto/configure
else
    echo "build-nginx: $src is not an nginx source tree" >&2
    exit 1
fi

cc_opt='-g -O2 -fPIC -fstack-protector-strong -D_FORTIFY_SOURCE=2 -Wall -Wextra -Wno-unused-parameter -Werror'
ld_opt='-Wl,-z,relro -Wl,-z,now -fPIC'

args=(--prefix="$out/prefix"
      --builddir="$out/objs"
      --with-compat --with-debug --with-pcre-jit --with-threads
      --with-http_ssl_module --with-http_v2_module
      --with-http_stub_status_module --with-http_realip_module
      --with-http_auth_request_module --with-http_dav_module
      --with-http_slice_module --with-http_addition_module
      --with-http_flv_module --with-http_gunzip_module
      --with-http_gzip_static_module --with-http_mp4_module
      --with-http_random_index_module --with-http_secure_link_module
      --with-http_sub_module
      --add-dynamic-module="$top")

stamp=$( { printf '%s\n' "$src" "$configure" "$cc_opt" "$ld_opt" "${args[@]}";
           cat "$top/config"; } | sha256sum | cut -d' ' -f1)

if [ ! -f "$out/objs/Makefile" ] || [ ! -f "$src/Makefile" ] \
   || [ "$(cat "$out/configure.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -f "$out/configure.stamp"
    if ! (cd "$src" && "$configure" "${args[@]}" \
              --with-cc-opt="$cc_opt" --with-ld-opt="$ld_opt") \
            > "$out/configure.log" 2>&1; then
        tail -n 30 "$out/configure.log" >&2
        echo "build-nginx: configure failed ($out/configure.log)" >&2
        exit 1
    fi
    echo "$stamp" > "$out/configure.stamp"
fi

jobs=${AQ_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
# The binary and the dynamic module ("make" builds both).
if ! make -C "$src" -j"$jobs" > "$out/make.log" 2>&1; then
    grep -E 'error|Error' "$out/make.log" | head -n 40 >&2 || true
    echo "build-nginx: make failed ($out/make.log)" >&2
    exit 1
fi

"$out/objs/nginx" -v 2>&1
