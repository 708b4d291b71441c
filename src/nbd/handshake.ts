/**
 * The server side of NBD's fixed-newstyle handshake: greeting, client flags,
 * then options until the client picks an export (EXPORT_NAME or GO) or leaves.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { ExportProvider, NbdBackend } from './backend.ts';
import {
  NbdDecodeError,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoName,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerReply,
  type BlockSizeLimits,
} from './codec.ts';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  META_CONTEXT_BASE_ALLOCATION,
  NBDMAGIC,
  Option,
  OptionReply,
  TransmissionFlag,
} from './constants.ts';
import type { SocketReader } from './socket-reader.ts';

export type { BlockSizeLimits };

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

const optionReply = encodeOptionReply;

function errorReply(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, Buffer.from(message, 'utf8'));
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
    const { magic, option, length } = decodeOptionHeader(await reader.read(16));
    if (magic !== IHAVEOPT) {
      log.warn('NBD option without IHAVEOPT magic: disconnecting');
      return undefined;
    }
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
          for (const info of exports.list()) socket.write(optionReply(option, OptionReply.SERVER, encodeServerReply(info.name, info.description)));
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
          const { exportName, queries } = decodeMetaContextRequest(data);
          if (!exports.has(exportName)) {
            socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${exportName}"`));
            break;
          }
          const matches = matchContexts(queries, list);
          if (!list) selectedContexts = matches;
          for (const context of matches) socket.write(optionReply(option, OptionReply.META_CONTEXT, encodeMetaContextReply(baseAllocationContextId, context)));
          socket.write(optionReply(option, OptionReply.ACK));
          break;
        }
        case Option.INFO:
        case Option.GO: {
          const { exportName, infos } = decodeInfoRequest(data);
          const backend = await exports.open(exportName, client);
          if (!backend) {
            socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${exportName}"`));
            break;
          }
          socket.write(optionReply(option, OptionReply.INFO, encodeInfoExport(backend.size, transmissionFlags(backend))));
          if (infos.includes(Info.BLOCK_SIZE)) socket.write(optionReply(option, OptionReply.INFO, encodeInfoBlockSize(limits)));
          if (infos.includes(Info.NAME)) socket.write(optionReply(option, OptionReply.INFO, encodeInfoName(exportName)));
          socket.write(optionReply(option, OptionReply.ACK));
          if (option === Option.GO) {
            return { exportName, backend, structuredReplies, baseAllocationId: selectedContexts.length ? baseAllocationContextId : undefined };
          }
          exports.release(exportName, client);
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
      if (!(err instanceof NbdDecodeError)) throw err;
      log.warn({ option, problem: err.message }, 'malformed NBD option');
      socket.write(errorReply(option, OptionReply.ERR_INVALID, err.message));
    }
  }
}
