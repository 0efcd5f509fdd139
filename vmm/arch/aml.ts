// A tiny ACPI Machine Language encoder: just what denovm's DSDT needs.
// Encodings: ACPI Specification 6.4, section 20.2 "AML Grammar Definition";
// resource descriptors: section 6.4 "Resource Data Types for ACPI".

/** One encoded AML term (or term list). */
export type Aml = number[];

// ---- Opcodes (ACPI 6.4 section 20.2) ----
/** 20.2.3 Data Objects Encoding: ConstObj and integer prefixes. */
export const ZERO_OP = 0x00;
export const ONE_OP = 0x01;
export const ONES_OP = 0xff;
export const BYTE_PREFIX = 0x0a;
export const WORD_PREFIX = 0x0b;
export const DWORD_PREFIX = 0x0c;
export const STRING_PREFIX = 0x0d;
export const QWORD_PREFIX = 0x0e;
/** 20.2.5.1 Namespace Modifier Objects Encoding: DefName, DefScope. */
export const NAME_OP = 0x08;
export const SCOPE_OP = 0x10;
/** 20.2.5.4 Expression Opcodes Encoding: DefBuffer, DefPackage, DefLEqual. */
export const BUFFER_OP = 0x11;
export const PACKAGE_OP = 0x12;
export const LEQUAL_OP = 0x93;
/** 20.2.5.2 Named Objects Encoding: DefMethod, and DefDevice = ExtOpPrefix DeviceOp. */
export const METHOD_OP = 0x14;
export const EXT_OP_PREFIX = 0x5b;
export const DEVICE_OP = 0x82;
/** 20.2.5.3 Statement Opcodes Encoding: DefNotify, DefIfElse, DefReturn. */
export const NOTIFY_OP = 0x86;
export const IF_OP = 0xa0;
export const RETURN_OP = 0xa4;
/** 20.2.6.1 Arg Objects Encoding: Arg0Op..Arg6Op. */
export const ARG0_OP = 0x68;
/** 20.2.2 Name Objects Encoding. */
export const ROOT_CHAR = 0x5c; // '\'
export const PARENT_PREFIX_CHAR = 0x5e; // '^'
export const DUAL_NAME_PREFIX = 0x2e;
export const MULTI_NAME_PREFIX = 0x2f;
/** A NameSeg is 4 characters; shorter names are padded with '_' (20.2.2). */
const NAME_SEG_LEN = 4;

// ---- PkgLength (20.2.4) ----
/** One-byte PkgLength covers totals below 64; longer ones use 1..3 more bytes of 8 bits each above a 4-bit nibble. */
const PKG_LENGTH_ONE_BYTE_MAX = 0x3f;
const PKG_LENGTH_MAX = 2 ** 28;

/** PkgLength for `contentLength` bytes that follow it (the encoded value counts itself too). */
export function pkgLength(contentLength: number): Aml {
  if (contentLength + 1 <= PKG_LENGTH_ONE_BYTE_MAX) return [contentLength + 1];
  for (let extra = 1; extra <= 3; extra++) {
    const total = contentLength + 1 + extra;
    if (total < 2 ** (4 + 8 * extra)) {
      const out = [(extra << 6) | (total & 0xf)];
      for (let i = 0; i < extra; i++) out.push((total >>> (4 + 8 * i)) & 0xff);
      return out;
    }
  }
  throw new RangeError(`AML package of ${contentLength} bytes exceeds PkgLength's ${PKG_LENGTH_MAX}`);
}

function concat(parts: Aml[]): Aml {
  return parts.flat();
}

// ---- Names ----
function nameSeg(seg: string): Aml {
  if (seg.length < 1 || seg.length > NAME_SEG_LEN || !/^[A-Z_][A-Z0-9_]*$/.test(seg)) {
    throw new RangeError(`bad AML NameSeg "${seg}"`);
  }
  return [...seg.padEnd(NAME_SEG_LEN, "_")].map((c) => c.charCodeAt(0));
}

/** NameString from ASL-style path: "\\_SB.PWRB", "^FOO", "_S5". */
export function nameString(path: string): Aml {
  const out: Aml = [];
  let rest = path;
  if (rest.startsWith("\\")) {
    out.push(ROOT_CHAR);
    rest = rest.slice(1);
  }
  while (rest.startsWith("^")) {
    out.push(PARENT_PREFIX_CHAR);
    rest = rest.slice(1);
  }
  const segs = rest === "" ? [] : rest.split(".");
  if (segs.length === 0) out.push(ZERO_OP); // NullName
  else if (segs.length === 1) out.push(...nameSeg(segs[0]));
  else if (segs.length === 2) out.push(DUAL_NAME_PREFIX, ...nameSeg(segs[0]), ...nameSeg(segs[1]));
  else out.push(MULTI_NAME_PREFIX, segs.length, ...segs.flatMap(nameSeg));
  return out;
}

// ---- Data ----
/** An integer, in the shortest encoding (20.2.3 ComputationalData / ConstObj). */
export function integer(v: number | bigint): Aml {
  const n = BigInt(v);
  if (n < 0n || n >= 2n ** 64n) throw new RangeError(`AML integer ${v} out of range`);
  if (n === 0n) return [ZERO_OP];
  if (n === 1n) return [ONE_OP];
  const le = (bytes: number) => Array.from({ length: bytes }, (_, i) => Number((n >> BigInt(8 * i)) & 0xffn));
  if (n < 0x100n) return [BYTE_PREFIX, ...le(1)];
  if (n < 0x10000n) return [WORD_PREFIX, ...le(2)];
  if (n < 0x1_0000_0000n) return [DWORD_PREFIX, ...le(4)];
  return [QWORD_PREFIX, ...le(8)];
}

/** A NUL-terminated ASCII string (20.2.3 String). */
export function string(s: string): Aml {
  const codes = [...s].map((c) => c.charCodeAt(0));
  if (codes.some((c) => c === 0 || c > 0x7f)) throw new RangeError("AML strings are ASCII without NUL");
  return [STRING_PREFIX, ...codes, 0];
}

/**
 * EISA id "PNP0501" compressed to a DWord, as ASL's EISAID() does: three letters of
 * 5 bits each (A = 1) then four hex digits, stored most significant byte first.
 */
export function eisaId(id: string): Aml {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new RangeError(`bad EISA id "${id}"`);
  const c = [0, 1, 2].map((i) => id.charCodeAt(i) - 0x40);
  const hex = parseInt(id.slice(3), 16);
  const bytes = [(c[0] << 2) | (c[1] >> 3), ((c[1] & 7) << 5) | c[2], hex >> 8, hex & 0xff];
  return [DWORD_PREFIX, ...bytes];
}

/** Buffer from raw bytes (20.2.5.4 DefBuffer := BufferOp PkgLength BufferSize ByteList). */
export function buffer(bytes: Aml): Aml {
  const body = concat([integer(bytes.length), bytes]);
  return concat([[BUFFER_OP], pkgLength(body.length), body]);
}

/** Package of data objects (20.2.5.4 DefPackage := PackageOp PkgLength NumElements PackageElementList). */
export function pkg(elements: Aml[]): Aml {
  if (elements.length > 0xff) throw new RangeError("AML Package with more than 255 elements");
  const body = concat([[elements.length], ...elements]);
  return concat([[PACKAGE_OP], pkgLength(body.length), body]);
}

// ---- Objects and statements ----
/** Name(path, value). */
export function name(path: string, value: Aml): Aml {
  return concat([[NAME_OP], nameString(path), value]);
}

/** Scope(path) { terms }. */
export function scope(path: string, terms: Aml[]): Aml {
  const body = concat([nameString(path), ...terms]);
  return concat([[SCOPE_OP], pkgLength(body.length), body]);
}

/** Device(path) { terms }. */
export function device(path: string, terms: Aml[]): Aml {
  const body = concat([nameString(path), ...terms]);
  return concat([[EXT_OP_PREFIX, DEVICE_OP], pkgLength(body.length), body]);
}

/** MethodFlags (20.2.5.2): ArgCount in bits 0..2, SerializeFlag in bit 3. */
const METHOD_SERIALIZED = 1 << 3;

/** Method(path, argCount, Serialized?) { terms }. */
export function method(path: string, argCount: number, serialized: boolean, terms: Aml[]): Aml {
  if (argCount < 0 || argCount > 7) throw new RangeError("AML methods take 0..7 arguments");
  const body = concat([nameString(path), [argCount | (serialized ? METHOD_SERIALIZED : 0)], ...terms]);
  return concat([[METHOD_OP], pkgLength(body.length), body]);
}

/** If (predicate) { terms }. */
export function ifThen(predicate: Aml, terms: Aml[]): Aml {
  const body = concat([predicate, ...terms]);
  return concat([[IF_OP], pkgLength(body.length), body]);
}

/** LEqual(a, b). */
export function lEqual(a: Aml, b: Aml): Aml {
  return concat([[LEQUAL_OP], a, b]);
}

/** ArgN. */
export function arg(n: number): Aml {
  if (n < 0 || n > 6) throw new RangeError("AML has Arg0..Arg6");
  return [ARG0_OP + n];
}

/** Notify(path, value). */
export function notify(path: string, value: number): Aml {
  return concat([[NOTIFY_OP], nameString(path), integer(value)]);
}

/** Return(value). */
export function ret(value: Aml): Aml {
  return concat([[RETURN_OP], value]);
}

// ---- Resource descriptors (ACPI 6.4 section 6.4) ----
/** Small resource tags: byte 0 = (item name << 3) | length (6.4.2). */
const SMALL_IRQ_NO_FLAGS = (0x04 << 3) | 2; // 6.4.2.1 IRQ Descriptor, 2 bytes: no information byte
const SMALL_IO = (0x08 << 3) | 7; // 6.4.2.5 I/O Port Descriptor
const SMALL_END_TAG = (0x0f << 3) | 1; // 6.4.2.9 End Tag
/** Large resource item names: byte 0 = 0x80 | name, then a 16-bit length (6.4.3). */
const LARGE_MEMORY32_FIXED = 0x86; // 6.4.3.4 32-Bit Fixed Memory Range Descriptor
const LARGE_EXTENDED_IRQ = 0x89; // 6.4.3.6 Extended Interrupt Descriptor
const MEMORY32_FIXED_LENGTH = 9;
/** I/O descriptor information: bit 0 = decodes 16 address bits. */
const IO_DECODE16 = 1 << 0;
/** Memory descriptor information: bit 0 = read/write. */
const MEMORY_READ_WRITE = 1 << 0;
/** Extended interrupt flags (6.4.3.6): consumer, edge (else level), active low (else high), shared. */
const EXT_IRQ_CONSUMER = 1 << 0;
const EXT_IRQ_EDGE = 1 << 1;
const EXT_IRQ_ACTIVE_LOW = 1 << 2;
const EXT_IRQ_SHARED = 1 << 3;

function le16(v: number): Aml {
  return [v & 0xff, (v >>> 8) & 0xff];
}
function le32(v: number): Aml {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

/** IO(Decode16, min, max, alignment, length). */
export function ioPort(min: number, max: number, alignment: number, length: number): Aml {
  return [SMALL_IO, IO_DECODE16, ...le16(min), ...le16(max), alignment, length];
}

/** IRQNoFlags() { irq } — ISA-style edge, active-high, exclusive. */
export function irqNoFlags(irq: number): Aml {
  if (irq < 0 || irq > 15) throw new RangeError(`IRQNoFlags takes ISA IRQs 0..15, not ${irq}`);
  return [SMALL_IRQ_NO_FLAGS, ...le16(1 << irq)];
}

/** Memory32Fixed(ReadWrite, base, length). */
export function memory32Fixed(base: number, length: number): Aml {
  return [LARGE_MEMORY32_FIXED, ...le16(MEMORY32_FIXED_LENGTH), MEMORY_READ_WRITE, ...le32(base), ...le32(length)];
}

export interface InterruptOptions {
  edge: boolean;
  activeLow?: boolean;
  shared?: boolean;
}

/** Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) { gsi }. */
export function interrupt(gsi: number, opts: InterruptOptions): Aml {
  const flags = EXT_IRQ_CONSUMER | (opts.edge ? EXT_IRQ_EDGE : 0) | (opts.activeLow ? EXT_IRQ_ACTIVE_LOW : 0) |
    (opts.shared ? EXT_IRQ_SHARED : 0);
  const body = [flags, 1, ...le32(gsi)]; // flags, interrupt table length 1, the interrupt number
  return [LARGE_EXTENDED_IRQ, ...le16(body.length), ...body];
}

/** ResourceTemplate() { descriptors }: a Buffer ending with an End Tag whose checksum makes the bytes sum to 0. */
export function resourceTemplate(descriptors: Aml[]): Aml {
  const bytes = concat([...descriptors, [SMALL_END_TAG]]);
  const sum = bytes.reduce((s, b) => (s + b) & 0xff, 0);
  bytes.push((0x100 - sum) & 0xff);
  return buffer(bytes);
}
