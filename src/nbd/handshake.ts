/**
 * The server side of NBD's fixed-newstyle handshake: greeting, client flags,
 * then options until the client picks an export (EXPORT_NAME or GO) or leaves.
 */
import type { Logger } from 'pino';
import type { ExportProvider, NbdBackend } from './backend.ts';
import type { NbdChannel, NbdServerTls } from './channel.ts';
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

export type { BlockSizeLimits };

export interface NegotiatedSession {
  exportName: string;
  backend: NbdBackend;
  structuredReplies: boolean;
  /** Meta context id for base:allocation, when the client selected it. */
  baseAllocationId: number | undefined;
  /** Who the client's certificate says it is, when it came over TLS. */
  peer: string | undefined;
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

/**
 * With `tls`, TLS is mandatory (the protocol's FORCEDTLS mode): before
 * NBD_OPT_STARTTLS every option but NBD_OPT_ABORT is answered
 * NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot be answered
 * with an error, ends the connection. A client whose certificate `tls.admit`
 * refuses gets NBD_REP_ERR_POLICY for everything but NBD_OPT_ABORT.
 */
export async function negotiate(
  channel: NbdChannel,
  exports: ExportProvider,
  limits: BlockSizeLimits,
  client: string,
  log: Logger,
  tls?: NbdServerTls,
): Promise<NegotiatedSession | undefined> {
  let peer: string | undefined;
  let refusal: string | undefined;
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  channel.socket.write(greeting);

  const clientFlags = (await channel.reader.read(4)).readUInt32BE(0);
  if (!(clientFlags & CLIENT_FLAG_FIXED_NEWSTYLE) || clientFlags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) {
    // The protocol's answer to unknown client flags is to disconnect.
    log.warn({ clientFlags }, 'NBD client flags not supported: disconnecting');
    return undefined;
  }
  const noZeroes = (clientFlags & CLIENT_FLAG_NO_ZEROES) !== 0;
  let structuredReplies = false;
  let selectedContexts: string[] = [];

  for (;;) {
    const { magic, option, length } = decodeOptionHeader(await channel.reader.read(16));
    if (magic !== IHAVEOPT) {
      log.warn('NBD option without IHAVEOPT magic: disconnecting');
      return undefined;
    }
    if (length > maxOptionBytes) {
      log.warn({ option, length }, 'NBD option data too large');
      if (option === Option.EXPORT_NAME) return undefined;
      await channel.reader.skip(length);
      channel.socket.write(errorReply(option, OptionReply.ERR_TOO_BIG, `option data of ${length} bytes exceeds ${maxOptionBytes}`));
      continue;
    }
    const data = length ? await channel.reader.read(length) : Buffer.alloc(0);

    if (tls && !channel.secure && option !== Option.STARTTLS && option !== Option.ABORT) {
      if (option === Option.EXPORT_NAME) {
        log.warn('NBD client asked for an export without TLS: disconnecting');
        return undefined;
      }
      channel.socket.write(errorReply(option, OptionReply.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
      continue;
    }
    if (refusal !== undefined && option !== Option.STARTTLS && option !== Option.ABORT) {
      if (option === Option.EXPORT_NAME) return undefined;
      channel.socket.write(errorReply(option, OptionReply.ERR_POLICY, refusal));
      continue;
    }

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
          channel.socket.write(reply);
          return { exportName: name, backend, structuredReplies, baseAllocationId: selectedContexts.length ? baseAllocationContextId : undefined, peer };
        }
        case Option.ABORT:
          channel.socket.write(optionReply(option, OptionReply.ACK));
          return undefined;
        case Option.LIST:
          if (length !== 0) {
            channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data'));
            break;
          }
          for (const info of exports.list()) channel.socket.write(optionReply(option, OptionReply.SERVER, encodeServerReply(info.name, info.description)));
          channel.socket.write(optionReply(option, OptionReply.ACK));
          break;
        case Option.STRUCTURED_REPLY:
          if (length !== 0) {
            channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data'));
            break;
          }
          structuredReplies = true;
          channel.socket.write(optionReply(option, OptionReply.ACK));
          break;
        case Option.LIST_META_CONTEXT:
        case Option.SET_META_CONTEXT: {
          const list = option === Option.LIST_META_CONTEXT;
          if (!structuredReplies) {
            channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, 'meta contexts need structured replies first'));
            break;
          }
          const { exportName, queries } = decodeMetaContextRequest(data);
          if (!exports.has(exportName)) {
            channel.socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${exportName}"`));
            break;
          }
          const matches = matchContexts(queries, list);
          if (!list) selectedContexts = matches;
          for (const context of matches) channel.socket.write(optionReply(option, OptionReply.META_CONTEXT, encodeMetaContextReply(baseAllocationContextId, context)));
          channel.socket.write(optionReply(option, OptionReply.ACK));
          break;
        }
        case Option.INFO:
        case Option.GO: {
          const { exportName, infos } = decodeInfoRequest(data);
          const backend = await exports.open(exportName, client);
          if (!backend) {
            channel.socket.write(errorReply(option, OptionReply.ERR_UNKNOWN, `no export named "${exportName}"`));
            break;
          }
          channel.socket.write(optionReply(option, OptionReply.INFO, encodeInfoExport(backend.size, transmissionFlags(backend))));
          if (infos.includes(Info.BLOCK_SIZE)) channel.socket.write(optionReply(option, OptionReply.INFO, encodeInfoBlockSize(limits)));
          if (infos.includes(Info.NAME)) channel.socket.write(optionReply(option, OptionReply.INFO, encodeInfoName(exportName)));
          channel.socket.write(optionReply(option, OptionReply.ACK));
          if (option === Option.GO) {
            return { exportName, backend, structuredReplies, baseAllocationId: selectedContexts.length ? baseAllocationContextId : undefined, peer };
          }
          exports.release(exportName, client);
          break;
        }
        case Option.STARTTLS: {
          if (!tls) {
            channel.socket.write(errorReply(option, OptionReply.ERR_POLICY, 'TLS is not offered by this server'));
            break;
          }
          if (channel.secure) {
            channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, 'TLS is already on'));
            break;
          }
          if (length !== 0) {
            channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data'));
            break;
          }
          if (channel.reader.buffered > 0) {
            // Its TLS hello would be mixed up with an option sent before our reply.
            log.warn('NBD client sent more before NBD_OPT_STARTTLS was answered: disconnecting');
            return undefined;
          }
          const admission = tls.admit(await channel.startTls(tls, optionReply(option, OptionReply.ACK)));
          peer = admission.peer;
          if (admission.refusal === undefined) log.debug({ peer }, 'NBD client verified over TLS');
          else {
            refusal = admission.refusal;
            log.warn({ peer, refusal }, 'NBD client refused: its certificate does not allow it here');
          }
          break;
        }
        default:
          log.info({ option }, 'unsupported NBD option');
          channel.socket.write(errorReply(option, OptionReply.ERR_UNSUP, `option ${option} is not supported`));
      }
    } catch (err) {
      if (!(err instanceof NbdDecodeError)) throw err;
      log.warn({ option, problem: err.message }, 'malformed NBD option');
      channel.socket.write(errorReply(option, OptionReply.ERR_INVALID, err.message));
    }
  }
}
