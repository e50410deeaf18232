#!/usr/bin/env bash
# host/fuzz/libs.sh: build http-parser and wslay instrumented for libFuzzer,
# so that a campaign sees their branches too (Debian's shared libraries are
# not instrumented: the fuzzer would see only our callbacks' coverage).
# Only for fuzzing campaigns; nothing here is part of the build or the tests.
#   host/fuzz/libs.sh OUTDIR
# Clones the upstream sources into OUTDIR/src (http-parser at its last
# commit, which has the fixes Debian's 2.9.4-5 carries; wslay at
# release-1.1.1, Debian's version), writes OUTDIR/libhttp_parser.a and
# OUTDIR/libwslay.a (ASan and coverage, no UBSan: their own undefined
# behaviour is not ours to report), and prints the cmake options that use
# them in place of Debian's:
#   CC=clang cmake -S . -B build-fuzz -DMB_SANITIZE=address -DMB_FUZZ=ON <options>
set -euo pipefail
out=$(mkdir -p "${1:?usage: $0 OUTDIR}" && cd "$1" && pwd)
src=$out/src
mkdir -p "$src"
flags="-O1 -g -fsanitize=fuzzer-no-link,address -fno-omit-frame-pointer"

[ -d "$src/http-parser" ] || git clone -q https://github.com/nodejs/http-parser "$src/http-parser"
[ -d "$src/wslay" ] || git clone -q https://github.com/tatsuhiro-t/wslay "$src/wslay"
git -C "$src/wslay" checkout -q release-1.1.1

cd "$src/http-parser"
clang $flags -DHTTP_PARSER_STRICT=0 -c http_parser.c -o http_parser.o
rm -f "$out/libhttp_parser.a"
ar rcs "$out/libhttp_parser.a" http_parser.o

cd "$src/wslay/lib"
sed 's/@PACKAGE_VERSION@/1.1.1/' includes/wslay/wslayver.h.in > includes/wslay/wslayver.h
printf '#define HAVE_ARPA_INET_H 1\n#define HAVE_NETINET_IN_H 1\n' > config.h
for f in wslay_*.c; do
  clang $flags -DHAVE_CONFIG_H -I. -Iincludes -c "$f" -o "${f%.c}.o"
done
rm -f "$out/libwslay.a"
ar rcs "$out/libwslay.a" wslay_*.o

echo "-DHTTP_PARSER_LIB=$out/libhttp_parser.a -DWSLAY_LIB=$out/libwslay.a"
