/**
 * The server side of NBD's fixed-newstyle handshake: greeting, client flags,
 * then options until the client picks an export (EXPORT_NAME or GO) or leaves.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { ExportProvider, NbdBackend } from './backend.ts';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  META_CONTEXT_BASE_ALLOCATION,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  TransmissionFlag,
} from './constants.ts';
import type { SocketReader } from './socket-reader.ts';

export interface BlockSizeLimits {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NegotiatedSession {
  exportName: string;
  backend: NbdBackend;
  structuredReplies: boolean;
  /** Meta context id for base:allocation, when the client selected it. */
  baseAllocationId: number | undefined;
}

/** An option's data beyond this is refused: names and queries are at most a few KiB. */
const maxOptionBytes = 64 * 1024;
const baseAllocationContextId = 1;

class HandshakeError extends Error {}

export function transmissionFlags(backend: NbdBackend): number {
  let flags =
    TransmissionFlag.HAS_FLAGS |
    TransmissionFlag.SEND_FLUSH |
    TransmissionFlag.SEND_FUA |
    TransmissionFlag.SEND_TRIM |
    TransmissionFlag.SEND_WRITE_ZEROES |
    // Every connection shares one file handle per volume and FLUSH syncs it:
    // a flush on any connection makes all completed writes durable.
    TransmissionFlag.CAN_MULTI_CONN;
  if (backend.readOnly) flags |= TransmissionFlag.READ_ONLY;
  return flags;
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return Buffer.concat([header, data]);
}

function errorReply(option: number, type: number, message: string): Buffer {
  return optionReply(option, type, Buffer.from(message, 'utf8'));
}

/** Parses "u32 length + bytes" at `offset`; throws HandshakeError when it does not fit. */
function readString(data: Buffer, offset: number, what: string): { value: string; next: number } {
  if (offset + 4 > data.length) throw new HandshakeError(`${what}: length missing`);
  const length = data.readUInt32BE(offset);
  if (offset + 4 + length > data.length) throw new HandshakeError(`${what}: ${length} bytes announced, ${data.length - offset - 4} sent`);
  return { value: data.toString('utf8', offset + 4, offset + 4 + length), next: offset + 4 + length };
}

/** Matches meta context queries against the one context we serve. */
function matchContexts(queries: string[], list: boolean): string[] {
  if (queries.length === 0) return list ? [META_CONTEXT_BASE_ALLOCATION] : [];
  const matches = queries.filter((q) => q === META_CONTEXT_BASE_ALLOCATION || (list && (q === 'base:' || q === 'base')));
  return matches.length ? [META_CONTEXT_BASE_ALLOCATION] : [];
}

export async function negotiate(
  reader: SocketReader,
  socket: Socket,
  exports: ExportProvider,
  limits: BlockSizeLimits,
  client: string,
  log: Logger,
): Promise<NegotiatedSession | undefined> {
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  socket.write(greeting);

  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if (!(clientFlags & CLIENT_FLAG_FIXED_NEWSTYLE) || clientFlags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) {
    // The protocol's answer to unknown client flags is to disconnect.
    log.warn({ clientFlags }, 'NBD client flags not supported: disconnecting');
    return undefined;
  }
  const noZeroes = (clientFlags & CLIENT_FLAG_NO_ZEROES) !== 0;
  let structuredReplies = false;
  let selectedContexts: string[] = [];

  for (;;) {
    const header = await reader.read(16);
    if (header.readBigUInt64BE(0) !== IHAVEOPT) {
      log.warn('NBD option without IHAVEOPT magic: disconnecting');
      return undefined;
    }
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    if (length > maxOptionBytes) {
      log.warn({ option, length }, 'NBD option data too large');
      if (option === Option.EXPORT_NAME) return undefined;
      await reader.skip(length);
      socket.write(errorReply(option, OptionReply.ERR_TOO_BIG, `option data of ${length} bytes exceeds ${maxOptionBytes}`));
      continue;
    }
    const data = length ? await reader.read(length) : Buffer.alloc(0);

    try {
      switch (option) {
        case Option.EXPORT_NAME: {
          const name = data.toString('utf8');
          const backend = await exports.open(name, client);
          if (!backend) {
            // Old-style EXPORT_NAME has no way to say no but to hang up.
            log.warn({ export: name }, 'NBD client asked for an unknown export');
            return undefined;
          }
          const reply = Buffer.alloc(noZeroes ? 10 : 134);
          reply.writeBigUInt64BE(BigInt(backend.size), 0);
          reply.writeUInt16BE(transmissionFlags(backend), 8);
          socket.write(reply);
          return { exportName: name, backend, structuredReplies, baseAllocationId: selectedContexts.length ? baseAllocationContextId : undefined };
        }
        case Option.ABORT:
          socket.write(optionReply(option, OptionReply.ACK));
          return undefined;
        case Option.LIST:
          if (length !== 0) {
            socket.write(errorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data'));
            break;
          }
          for (const info of exports.list()) {
            const name = Buffer.from(info.name, 'utf8');
            const entry = Buffer.alloc(4 + name.length);
            entry.writeUInt32BE(name.length, 0);
            name.copy(entry, 4);
            socket.write(optionReply(option, OptionReply.SERVER, Buffer.concat([entry, Buffer.from(info.description, 'utf8')])));
          }
          socket.write(optionReply(option, OptionReply.ACK));
          break;
        case Option.STRUCTURED_REPLY:
          if (length !== 0) {
            socket.write(errorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data'));
            break;
          }
          structuredReplies = true;
          socket.write(optionReply(option, OptionReply.ACK));
          break;
        case Option.LIST_META_CONTEXT:
        case Option.SET_META_CONTEXT: {
          const list = option === Option.LIST_META_CONTEXT;
          if (!structuredReplies) {
            socket.write(errorReply(option, OptionReply.ERR_INVALID, 'meta contexts need structured replies first'));
            break;
          }
          const name = readString(data, 0, 'export name');
          if (name.next + 4 > data.length) throw new HandshakeError('query count missing');
          const count = data.readUInt32BE(name.next);
          const queries: string[] = [];
          let next = name.next + 4;
          for (let i = 0; i < count; i++) {
            const query = readString(data, next, `query ${i}`);
            queries.push(query.value);
            next = query.next;
          }
          if (!exports.list().some((e) => e.name === name.value)) {
            socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${name.value}"`));
            break;
          }
          const matches = matchContexts(queries, list);
          if (!list) selectedContexts = matches;
          for (const context of matches) {
            const body = Buffer.alloc(4);
            body.writeUInt32BE(baseAllocationContextId, 0);
            socket.write(optionReply(option, OptionReply.META_CONTEXT, Buffer.concat([body, Buffer.from(context, 'utf8')])));
          }
          socket.write(optionReply(option, OptionReply.ACK));
          break;
        }
        case Option.INFO:
        case Option.GO: {
          const name = readString(data, 0, 'export name');
          if (name.next + 2 > data.length) throw new HandshakeError('information request count missing');
          const count = data.readUInt16BE(name.next);
          if (name.next + 2 + count * 2 !== data.length) throw new HandshakeError('information request list has the wrong length');
          const requests = Array.from({ length: count }, (_, i) => data.readUInt16BE(name.next + 2 + i * 2));
          const backend = await exports.open(name.value, client);
          if (!backend) {
            socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${name.value}"`));
            break;
          }
          const exportInfo = Buffer.alloc(12);
          exportInfo.writeUInt16BE(Info.EXPORT, 0);
          exportInfo.writeBigUInt64BE(BigInt(backend.size), 2);
          exportInfo.writeUInt16BE(transmissionFlags(backend), 10);
          socket.write(optionReply(option, OptionReply.INFO, exportInfo));
          if (requests.includes(Info.BLOCK_SIZE)) {
            const blockSize = Buffer.alloc(14);
            blockSize.writeUInt16BE(Info.BLOCK_SIZE, 0);
            blockSize.writeUInt32BE(limits.minimum, 2);
            blockSize.writeUInt32BE(limits.preferred, 6);
            blockSize.writeUInt32BE(limits.maximum, 10);
            socket.write(optionReply(option, OptionReply.INFO, blockSize));
          }
          if (requests.includes(Info.NAME)) {
            const nameInfo = Buffer.alloc(2);
            nameInfo.writeUInt16BE(Info.NAME, 0);
            socket.write(optionReply(option, OptionReply.INFO, Buffer.concat([nameInfo, Buffer.from(name.value, 'utf8')])));
          }
          socket.write(optionReply(option, OptionReply.ACK));
          if (option === Option.GO) {
            return { exportName: name.value, backend, structuredReplies, baseAllocationId: selectedContexts.length ? baseAllocationContextId : undefined };
          }
          exports.release(name.value, client);
          break;
        }
        case Option.STARTTLS:
          socket.write(errorReply(option, OptionReply.ERR_POLICY, 'TLS is not offered by this server'));
          break;
        default:
          log.info({ option }, 'unsupported NBD option');
          socket.write(errorReply(option, OptionReply.ERR_UNSUP, `option ${option} is not supported`));
      }
    } catch (err) {
      if (!(err instanceof HandshakeError)) throw err;
      log.warn({ option, problem: err.message }, 'malformed NBD option');
      socket.write(errorReply(option, OptionReply.ERR_INVALID, err.message));
    }
  }
}
