/**
 * Encoders and decoders for NBD's wire structures, shared by the server and
 * the client so both read the same layout from one place. Pure functions over
 * Buffers: no sockets, no state. Layouts follow the protocol document
 * (doc/proto.md in the NBD project); constants live in constants.ts.
 */
import {
  IHAVEOPT,
  Info,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  SIMPLE_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './constants.ts';

export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
const emptyBuffer = Buffer.alloc(0);

/** Thrown when bytes do not decode as the structure they claim to be. */
export class NbdDecodeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdDecodeError';
  }
}

// ---- Strings ------------------------------------------------------------

/** "u32 length + UTF-8 bytes", as export names and meta context queries are sent. */
export function encodeString(value: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  const out = Buffer.allocUnsafe(4 + bytes.length);
  out.writeUInt32BE(bytes.length, 0);
  bytes.copy(out, 4);
  return out;
}

/** Decodes "u32 length + bytes" at `offset`; throws NbdDecodeError when it does not fit. */
export function decodeString(data: Buffer, offset: number, what: string): { value: string; next: number } {
  if (offset + 4 > data.length) throw new NbdDecodeError(`${what}: length missing`);
  const length = data.readUInt32BE(offset);
  if (offset + 4 + length > data.length) throw new NbdDecodeError(`${what}: ${length} bytes announced, ${data.length - offset - 4} sent`);
  return { value: data.toString('utf8', offset + 4, offset + 4 + length), next: offset + 4 + length };
}

// ---- Handshake: options and option replies -------------------------------

/** A client's option: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = emptyBuffer): Buffer {
  const out = Buffer.allocUnsafe(OPTION_HEADER_BYTES + data.length);
  out.writeBigUInt64BE(IHAVEOPT, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(data.length, 12);
  data.copy(out, OPTION_HEADER_BYTES);
  return out;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

export function decodeOptionHeader(header: Buffer): OptionHeader {
  return { magic: header.readBigUInt64BE(0), option: header.readUInt32BE(8), length: header.readUInt32BE(12) };
}

/** A server's reply to an option. */
export function encodeOptionReply(option: number, type: number, data: Buffer = emptyBuffer): Buffer {
  const out = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  out.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(type, 12);
  out.writeUInt32BE(data.length, 16);
  data.copy(out, OPTION_REPLY_HEADER_BYTES);
  return out;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(header: Buffer): OptionReplyHeader {
  if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdDecodeError('option reply without its magic');
  return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), length: header.readUInt32BE(16) };
}

/** NBD_OPT_INFO / NBD_OPT_GO data: export name, then the NBD_INFO_* items asked for. */
export function encodeInfoRequest(exportName: string, infos: readonly number[]): Buffer {
  const name = encodeString(exportName);
  const out = Buffer.allocUnsafe(name.length + 2 + infos.length * 2);
  name.copy(out, 0);
  out.writeUInt16BE(infos.length, name.length);
  infos.forEach((info, i) => out.writeUInt16BE(info, name.length + 2 + i * 2));
  return out;
}

export function decodeInfoRequest(data: Buffer): { exportName: string; infos: number[] } {
  const name = decodeString(data, 0, 'export name');
  if (name.next + 2 > data.length) throw new NbdDecodeError('information request count missing');
  const count = data.readUInt16BE(name.next);
  if (name.next + 2 + count * 2 !== data.length) throw new NbdDecodeError('information request list has the wrong length');
  return { exportName: name.value, infos: Array.from({ length: count }, (_, i) => data.readUInt16BE(name.next + 2 + i * 2)) };
}

/** NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data: export name, then queries. */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([encodeString(exportName), count, ...queries.map(encodeString)]);
}

export function decodeMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } {
  const name = decodeString(data, 0, 'export name');
  if (name.next + 4 > data.length) throw new NbdDecodeError('query count missing');
  const count = data.readUInt32BE(name.next);
  const queries: string[] = [];
  let next = name.next + 4;
  for (let i = 0; i < count; i++) {
    const query = decodeString(data, next, `query ${i}`);
    queries.push(query.value);
    next = query.next;
  }
  if (next !== data.length) throw new NbdDecodeError('meta context request has trailing bytes');
  return { exportName: name.value, queries };
}

/** NBD_REP_META_CONTEXT data: the id the server gave the context, and its name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const out = Buffer.allocUnsafe(4 + bytes.length);
  out.writeUInt32BE(id, 0);
  bytes.copy(out, 4);
  return out;
}

export function decodeMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length < 4) throw new NbdDecodeError('meta context reply too short');
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** NBD_REP_SERVER data (an entry of NBD_OPT_LIST): name, then a description. */
export function encodeServerReply(name: string, description: string): Buffer {
  return Buffer.concat([encodeString(name), Buffer.from(description, 'utf8')]);
}

export function decodeServerReply(data: Buffer): { name: string; description: string } {
  const name = decodeString(data, 0, 'export name');
  return { name: name.value, description: data.toString('utf8', name.next) };
}

export interface BlockSizeLimits {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** The NBD_REP_INFO items this code knows; others decode as `unknown`. */
export type InfoItem =
  | { type: 'export'; size: number; flags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'block-size'; limits: BlockSizeLimits }
  | { type: 'unknown'; info: number };

export function encodeInfoExport(size: number, flags: number): Buffer {
  const out = Buffer.allocUnsafe(12);
  out.writeUInt16BE(Info.EXPORT, 0);
  out.writeBigUInt64BE(BigInt(size), 2);
  out.writeUInt16BE(flags, 10);
  return out;
}

export function encodeInfoBlockSize(limits: BlockSizeLimits): Buffer {
  const out = Buffer.allocUnsafe(14);
  out.writeUInt16BE(Info.BLOCK_SIZE, 0);
  out.writeUInt32BE(limits.minimum, 2);
  out.writeUInt32BE(limits.preferred, 6);
  out.writeUInt32BE(limits.maximum, 10);
  return out;
}

export function encodeInfoName(name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const out = Buffer.allocUnsafe(2 + bytes.length);
  out.writeUInt16BE(Info.NAME, 0);
  bytes.copy(out, 2);
  return out;
}

export function decodeInfo(data: Buffer): InfoItem {
  if (data.length < 2) throw new NbdDecodeError('information reply too short');
  const info = data.readUInt16BE(0);
  switch (info) {
    case Info.EXPORT:
      if (data.length !== 12) throw new NbdDecodeError(`NBD_INFO_EXPORT of ${data.length} bytes (12 expected)`);
      return { type: 'export', size: Number(data.readBigUInt64BE(2)), flags: data.readUInt16BE(10) };
    case Info.NAME:
      return { type: 'name', name: data.toString('utf8', 2) };
    case Info.DESCRIPTION:
      return { type: 'description', description: data.toString('utf8', 2) };
    case Info.BLOCK_SIZE:
      if (data.length !== 14) throw new NbdDecodeError(`NBD_INFO_BLOCK_SIZE of ${data.length} bytes (14 expected)`);
      return { type: 'block-size', limits: { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) } };
    default:
      return { type: 'unknown', info };
  }
}

// ---- Transmission: requests and replies ----------------------------------

export interface RequestHeader {
  flags: number;
  type: number;
  /** The client's 8-byte handle (cookie), echoed in every reply. */
  handle: Buffer;
  offset: number;
  length: number;
}

/** Writes a request header into `out` (28 bytes from `at`), or a new buffer. */
export function encodeRequest(request: RequestHeader, out: Buffer = Buffer.allocUnsafe(REQUEST_HEADER_BYTES), at = 0): Buffer {
  out.writeUInt32BE(REQUEST_MAGIC, at);
  out.writeUInt16BE(request.flags, at + 4);
  out.writeUInt16BE(request.type, at + 6);
  request.handle.copy(out, at + 8, 0, 8);
  out.writeBigUInt64BE(BigInt(request.offset), at + 16);
  out.writeUInt32BE(request.length, at + 24);
  return out;
}

/** Decodes a request header; the magic is returned, not checked, so the caller decides what a wrong one means. */
export function decodeRequest(header: Buffer): RequestHeader & { magic: number } {
  return {
    magic: header.readUInt32BE(0),
    flags: header.readUInt16BE(4),
    type: header.readUInt16BE(6),
    // Copied: the header's bytes belong to the socket reader's chunk.
    handle: Buffer.from(header.subarray(8, 16)),
    // Offsets past 2^53 are past the end of any export; as a rounded Number they still compare as such.
    offset: header.readUInt32BE(16) * 2 ** 32 + header.readUInt32BE(20),
    length: header.readUInt32BE(24),
  };
}

export function encodeSimpleReplyHeader(handle: Buffer, errno: number): Buffer {
  const out = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  out.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(errno, 4);
  handle.copy(out, 8, 0, 8);
  return out;
}

/** A structured reply chunk's header; `extra` bytes of the buffer are left for the caller (payload prefix). */
export function encodeChunkHeader(handle: Buffer, flags: number, type: number, length: number, extra = 0): Buffer {
  const out = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + extra);
  out.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  handle.copy(out, 8, 0, 8);
  out.writeUInt32BE(length, 16);
  return out;
}

/** The first 4 bytes of any reply tell simple from structured; the rest of the header depends on it. */
export type ReplyHeader =
  | { kind: 'simple'; errno: number; handle: Buffer }
  | { kind: 'structured'; flags: number; type: number; handle: Buffer; length: number };

/** Decodes a reply header: `header` holds 16 bytes (simple) or 20 (structured); see replyHeaderBytes. */
export function decodeReplyHeader(header: Buffer): ReplyHeader {
  const magic = header.readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) return { kind: 'simple', errno: header.readUInt32BE(4), handle: header.subarray(8, 16) };
  if (magic === STRUCTURED_REPLY_MAGIC) {
    return { kind: 'structured', flags: header.readUInt16BE(4), type: header.readUInt16BE(6), handle: header.subarray(8, 16), length: header.readUInt32BE(16) };
  }
  throw new NbdDecodeError(`reply with an unknown magic 0x${magic.toString(16)}`);
}

/** How many header bytes a reply that starts with `magic` has. */
export function replyHeaderBytes(magic: number): number {
  if (magic === SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_HEADER_BYTES;
  if (magic === STRUCTURED_REPLY_MAGIC) return STRUCTURED_REPLY_HEADER_BYTES;
  throw new NbdDecodeError(`reply with an unknown magic 0x${magic.toString(16)}`);
}

export interface Extent {
  length: number;
  /** base:allocation flags: STATE_HOLE | STATE_ZERO. */
  flags: number;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS payload: context id, then (length, flags) pairs. */
export function encodeBlockStatus(contextId: number, extents: readonly Extent[]): Buffer {
  const out = Buffer.allocUnsafe(4 + extents.length * 8);
  out.writeUInt32BE(contextId, 0);
  extents.forEach((extent, i) => {
    out.writeUInt32BE(extent.length, 4 + i * 8);
    out.writeUInt32BE(extent.flags, 8 + i * 8);
  });
  return out;
}

export function decodeBlockStatus(data: Buffer): { contextId: number; extents: Extent[] } {
  if (data.length < 12 || (data.length - 4) % 8 !== 0) throw new NbdDecodeError(`block status payload of ${data.length} bytes`);
  const extents: Extent[] = [];
  for (let at = 4; at < data.length; at += 8) extents.push({ length: data.readUInt32BE(at), flags: data.readUInt32BE(at + 4) });
  return { contextId: data.readUInt32BE(0), extents };
}

/** NBD_REPLY_TYPE_ERROR / ERROR_OFFSET payload: errno, message, and (ERROR_OFFSET) the offset. */
export function encodeErrorPayload(errno: number, message: string): Buffer {
  const text = Buffer.from(message.slice(0, 1024), 'utf8');
  const out = Buffer.allocUnsafe(6 + text.length);
  out.writeUInt32BE(errno, 0);
  out.writeUInt16BE(text.length, 4);
  text.copy(out, 6);
  return out;
}

export function decodeErrorPayload(data: Buffer): { errno: number; message: string; offset?: number } {
  if (data.length < 6) throw new NbdDecodeError('error chunk too short');
  const length = data.readUInt16BE(4);
  if (6 + length > data.length) throw new NbdDecodeError('error chunk message overruns the chunk');
  const message = data.toString('utf8', 6, 6 + length);
  const rest = data.length - 6 - length;
  if (rest === 8) return { errno: data.readUInt32BE(0), message, offset: Number(data.readBigUInt64BE(6 + length)) };
  return { errno: data.readUInt32BE(0), message };
}
