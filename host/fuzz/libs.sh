#!/usr/bin/env bash
# host/fuzz/libs.sh: build http-parser, wslay and ei instrumented for
# libFuzzer, so that a campaign sees their branches too (Debian's libraries
# are not instrumented: the fuzzer would see only our callbacks' coverage,
# and AddressSanitizer none of their reads).
# Only for fuzzing campaigns; nothing here is part of the build or the tests.
#   host/fuzz/libs.sh OUTDIR [LIB...]      LIB: http-parser wslay ei (default: all)
# Clones the upstream sources into OUTDIR/src (http-parser at its last
# commit, which has the fixes Debian's 2.9.4-5 carries; wslay at
# release-1.1.1, Debian's version; ei from Erlang/OTP at the installed
# release, or from the OTP source tree OTP_SRC if set - Debian's, from
# `apt-get source erlang`, is the installed one), writes OUTDIR/lib*.a
# (ASan and coverage, no UBSan: their own undefined behaviour is not ours
# to report), and prints the cmake options that use them in place of
# Debian's:
#   CC=clang cmake -S . -B build-fuzz -DMB_SANITIZE=address -DMB_FUZZ=ON <options>
set -euo pipefail
out=$(mkdir -p "${1:?usage: $0 OUTDIR [http-parser wslay ei]}" && cd "$1" && pwd)
shift
libs=${*:-http-parser wslay ei}
src=$out/src
mkdir -p "$src"
flags="-O1 -g -fsanitize=fuzzer-no-link,address -fno-omit-frame-pointer"
opts=()

for lib in $libs; do
  case $lib in
  http-parser)
    [ -d "$src/http-parser" ] || git clone -q https://github.com/nodejs/http-parser "$src/http-parser"
    cd "$src/http-parser"
    clang $flags -DHTTP_PARSER_STRICT=0 -c http_parser.c -o http_parser.o
    rm -f "$out/libhttp_parser.a"
    ar rcs "$out/libhttp_parser.a" http_parser.o
    opts+=("-DHTTP_PARSER_LIB=$out/libhttp_parser.a")
    ;;
  wslay)
    [ -d "$src/wslay" ] || git clone -q https://github.com/tatsuhiro-t/wslay "$src/wslay"
    git -C "$src/wslay" checkout -q release-1.1.1
    cd "$src/wslay/lib"
    sed 's/@PACKAGE_VERSION@/1.1.1/' includes/wslay/wslayver.h.in > includes/wslay/wslayver.h
    printf '#define HAVE_ARPA_INET_H 1\n#define HAVE_NETINET_IN_H 1\n' > config.h
    for f in wslay_*.c; do
      clang $flags -DHAVE_CONFIG_H -I. -Iincludes -c "$f" -o "${f%.c}.o"
    done
    rm -f "$out/libwslay.a"
    ar rcs "$out/libwslay.a" wslay_*.o
    opts+=("-DWSLAY_LIB=$out/libwslay.a")
    ;;
  ei)
    # The whole library (the distribution layer uses its connect side too),
    # so that no object of Debian's uninstrumented libei.a is linked.
    otp=${OTP_SRC:-$src/otp}
    if [ ! -d "$otp/lib/erl_interface" ]; then
      rel=$(head -1 /usr/lib/erlang/releases/*/OTP_VERSION)
      git clone -q --depth 1 --filter=blob:none --sparse -b "OTP-$rel" \
        https://github.com/erlang/otp "$otp"
      git -C "$otp" sparse-checkout set lib/erl_interface
    fi
    ei=$otp/lib/erl_interface/src
    mkdir -p "$out/ei"
    cd "$out/ei"
    # What OTP's configure finds on Linux x86-64, for the macros ei reads.
    printf '%s\n' '#define HAVE_SOCKLEN_T 1' '#define HAVE_PTHREAD_H 1' \
      '#define HAVE_SYS_TIME_H 1' '#define HAVE_WRITEV 1' '#define HAVE_SYS_UIO_H 1' \
      '#define HAVE_SYS_SELECT_H 1' '#define HAVE_SYSCONF 1' '#define HAVE_ISFINITE 1' \
      '#define SIZEOF_VOID_P 8' '#define SIZEOF_LONG 8' '#define SIZEOF_INT 4' \
      '#define SIZEOF_LONG_LONG 8' > config.h
    for f in "$ei"/{connect,decode,encode,epmd,global,misc}/*.c; do
      clang $flags -D_REENTRANT -DEI_NO_DEPR_WARN -I. -I"$ei/../include" \
        -I"$ei/connect" -I"$ei/decode" -I"$ei/encode" -I"$ei/epmd" -I"$ei/misc" \
        -c "$f" -o "$(basename "${f%.c}").o"
    done
    rm -f "$out/libei.a"
    ar rcs "$out/libei.a" ./*.o
    opts+=("-DEI_LIB=$out/libei.a")
    ;;
  *)
    echo "$0: unknown library $lib" >&2
    exit 2
    ;;
  esac
done

echo "${opts[*]}"
