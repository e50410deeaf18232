#!/usr/bin/env bash
# http_hello_nginx.sh: HTTP hello world on nginx + its Lua module (OpenResty's
# lua-nginx-module, as Debian packages it), for the HTTP benchmark
# (scripts/bench http); the twin of http_hello.lua and http_hello.js.
#
# Usage: http_hello_nginx.sh DIR [port=N]
# DIR holds the Debian packages nginx, nginx-common, libnginx-mod-http-lua,
# libnginx-mod-http-ndk, libluajit2-5.1-2, lua-resty-core and
# lua-resty-lrucache unpacked with `dpkg-deb -x` into DIR/root (scripts/bench
# does it). They are never installed: libnginx-mod-http-lua depends on
# OpenResty's LuaJIT, which would replace Debian's LuaJIT system-wide, so
# nginx runs from DIR with LD_LIBRARY_PATH. One worker process (like Node, one
# core), bound to 127.0.0.1 only; every request gets "Hello, world!\n" with
# Content-Length, from content_by_lua. Prints "listening port=<port>
# pid=<nginx's pid>" once nginx accepts connections, then runs until killed
# (kill the printed pid). MB_NGINX_WRAP: a command nginx runs under (word-split;
# scripts/instructions nginx runs it under valgrind's callgrind so).
set -u
dir=${1:?usage: http_hello_nginx.sh DIR [port=N]}
root=$dir/root
port=0
for a in "${@:2}"; do case $a in port=*) port=${a#port=} ;; esac; done
if [ "$port" = 0 ]; then
  # nginx cannot listen on port 0 and report the port: take a free one.
  for p in $(seq 18080 18180); do
    if ! ss -ltnH "sport = :$p" 2>/dev/null | grep -q .; then port=$p; break; fi
  done
fi
run=$(mktemp -d "${TMPDIR:-/tmp}/mb-nginx.XXXXXX")
mkdir -p "$run/logs" "$run/tmp"
cat > "$run/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $run/nginx.pid;
error_log $run/logs/error.log warn;
load_module $root/usr/lib/nginx/modules/ndk_http_module.so;
load_module $root/usr/lib/nginx/modules/ngx_http_lua_module.so;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $run/tmp;
  proxy_temp_path $run/tmp;
  fastcgi_temp_path $run/tmp;
  uwsgi_temp_path $run/tmp;
  scgi_temp_path $run/tmp;
  lua_package_path "$root/usr/share/lua/5.1/?.lua;;";
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    location / {
      default_type text/plain;
      content_by_lua_block {
        ngx.header["Content-Length"] = 14
        ngx.print("Hello, world!\n")
      }
    }
  }
}
CONF
# shellcheck disable=SC2086
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu" ${MB_NGINX_WRAP:-} "$root/usr/sbin/nginx" \
  -p "$run" -c "$run/nginx.conf" -e "$run/logs/error.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; rm -rf "$run"' EXIT
trap 'exit 143' TERM INT
tries=100
[ -n "${MB_NGINX_WRAP:-}" ] && tries=600   # (valgrind starts slowly)
for _ in $(seq $tries); do
  if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
    echo "listening port=$port pid=$pid"
    wait "$pid"
    exit $?
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
echo "http_hello_nginx: nginx did not start:" >&2
cat "$run/logs/error.log" >&2
exit 1
