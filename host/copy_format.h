/* copy_format.h: the byte format of a message, shared by the encoder
 * (copy.c) and the decoder (copy_decode.c). Internal to the codec.
 *
 * FORMAT
 * A message payload is msg->nvalues values back to back. A value is one tag
 * byte followed by its body. Multi-byte integers are in host byte order:
 * messages never leave the host. "varint" is an unsigned LEB128 of at most
 * 5 bytes (7 bits a byte, low bits first). No byte of a payload is ever
 * handed to LuaJIT's bytecode loader, so a decoder fed arbitrary bytes
 * can only fail with "corrupt message".
 *
 *   0x00 nil            0x01 false            0x02 true
 *   0x03 number         8 bytes: the double, memcpy'd (inf, -0 survive;
 *                       NaN stays NaN, though LuaJIT canonicalises its bits)
 *   0x80|n string       n < 128 bytes follow (short string, the usual case)
 *   0x04 string         varint length, then the bytes
 *   0x05 table          varint narr, uint32 nhash, then narr values (keys
 *                       1..narr, nil for holes), then nhash key/value pairs
 *   0x06 function       varint i: the function's bytecode is the message's
 *                       code object i (msg.h, code.h: lua_dump's bytes,
 *                       debug info kept, never carried in the payload),
 *                       then uint8 nups, then nups values, upvalue 1 first
 *   0x07 pid            8 bytes: the id (never 0); likewise for every id
 *   0x08 ref            kind registered with mb_id_register (pid.h), whose
 *                       tags are 0x07, 0x08 and 0x0D..0x1F
 *   0x09 back-reference varint: payload offset of the tag of an object met
 *                       earlier in this message
 *   0x0A module         varint length + name: require(name) in the receiver
 *   0x0B C function     varint length + module name, varint length + field
 *                       name: require(module)[field] in the receiver
 *   0x0C joined upvalue varint offset of an earlier function's tag, uint8
 *                       upvalue number n: only in place of an upvalue; this
 *                       upvalue is the same variable as upvalue n of that
 *                       function (two closures over one local), and the
 *                       decoder joins them (lua_upvaluejoin)
 *   0x0D socket, 0x0E timer, 0x0F atom, ...: id kinds, as 0x07
 *   0x10 remote ref     a ref of another node by its contents (remote.h: refs
 *                       are interned only while held): uint32 node (an atom
 *                       id), uint32 creation, uint8 n (1..5), n uint32 words;
 *                       the decoder interns it; 0x10 is never a kind's tag
 *   0x40 tuple          varint n, then n values (elements 1..n, nil for
 *                       holes): a table with the tuple metatable (term.h)
 *                       and field n = n
 *   0x20 flag "shared"  or'ed into 0x05, 0x06, 0x0A, 0x0B or 0x40 when a later
 *                       back-reference points at this object; only those
 *                       objects are remembered by the decoder, so a message
 *                       without sharing costs the decoder nothing extra.
 *
 */
#ifndef MB_COPY_FORMAT_H
#define MB_COPY_FORMAT_H

/* lua_type() of an FFI cdata value; LuaJIT's lua.h has no name for it. */
#define TYPE_CDATA 10

enum {
  T_NIL = 0x00,
  T_FALSE = 0x01,
  T_TRUE = 0x02,
  T_NUMBER = 0x03,
  T_STRING = 0x04,
  T_TABLE = 0x05,
  T_FUNCTION = 0x06,
  T_BACKREF = 0x09,
  T_MODULE = 0x0A,
  T_CFIELD = 0x0B,
  T_UPJOIN = 0x0C,
  T_RREF = 0x10,
  T_SHARED = 0x20,
  T_TUPLE = 0x40,
  T_SHORTSTR = 0x80,
};
#define SHORTSTR_MAX 0x7F

/* Stack slots one nesting level may use, including those an error report
 * needs while all levels are still on the stack. */
#define LEVEL_SLOTS 10

#endif
