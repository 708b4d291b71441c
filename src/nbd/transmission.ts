/**
 * The transmission phase: requests are read in order, checked by one
 * validator, run concurrently against the backend, and answered as each
 * finishes (replies may overtake each other, as the protocol allows).
 * In-flight work per connection is bounded in count and bytes.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { NbdBackendError } from './backend.ts';
import {
  Command,
  CommandFlag,
  NbdErrno,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './constants.ts';
import type { BlockSizeLimits, NegotiatedSession } from './handshake.ts';
import type { SocketReader } from './socket-reader.ts';

interface Request {
  flags: number;
  type: number;
  handle: Buffer;
  offset: number;
  length: number;
}

export interface TransmissionLimits extends BlockSizeLimits {
  maxInFlightRequests: number;
  /** Bytes of READ/WRITE requests being executed at once. */
  maxInFlightBytes: number;
  /** Reply bytes queued for a client that does not read them; no new request is read past this. */
  maxQueuedReplyBytes: number;
}

/** Resolves once the socket's queued output has drained (or the socket is gone). */
function drained(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

const commandNames: Record<number, string> = Object.fromEntries(Object.entries(Command).map(([name, value]) => [value, name]));
const allowedFlags: Record<number, number> = {
  [Command.READ]: CommandFlag.DF,
  [Command.WRITE]: CommandFlag.FUA,
  [Command.DISC]: 0,
  [Command.FLUSH]: 0,
  [Command.TRIM]: CommandFlag.FUA,
  [Command.WRITE_ZEROES]: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
  [Command.BLOCK_STATUS]: CommandFlag.REQ_ONE,
};
const writingCommands = new Set<number>([Command.WRITE, Command.TRIM, Command.WRITE_ZEROES]);

/** The one place that decides whether a request may reach the backend; returns an NBD errno or 0. */
export function validateRequest(request: Request, session: NegotiatedSession, limits: BlockSizeLimits): { errno: number; why: string } | undefined {
  const { backend } = session;
  const allowed = allowedFlags[request.type];
  if (allowed === undefined) return { errno: NbdErrno.EINVAL, why: `unknown command ${request.type}` };
  if (request.flags & ~allowed) return { errno: NbdErrno.EINVAL, why: `flags 0x${request.flags.toString(16)} not valid for ${commandNames[request.type]}` };
  if (request.type === Command.DISC || request.type === Command.FLUSH) {
    return request.offset === 0 && request.length === 0 ? undefined : { errno: NbdErrno.EINVAL, why: `${commandNames[request.type]} with offset or length` };
  }
  if (writingCommands.has(request.type) && backend.readOnly) return { errno: NbdErrno.EPERM, why: 'the export is read-only' };
  if (request.type === Command.BLOCK_STATUS && session.baseAllocationId === undefined) {
    return { errno: NbdErrno.EINVAL, why: 'BLOCK_STATUS without a negotiated meta context' };
  }
  if ((request.type === Command.READ || request.type === Command.WRITE) && request.length > limits.maximum) {
    return { errno: NbdErrno.EINVAL, why: `length ${request.length} exceeds the maximum block size ${limits.maximum}` };
  }
  if (request.length === 0 && request.type !== Command.BLOCK_STATUS) return { errno: NbdErrno.EINVAL, why: 'zero length' };
  if (request.offset + request.length > backend.size) {
    const errno = request.type === Command.WRITE || request.type === Command.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    return { errno, why: `offset ${request.offset} + length ${request.length} is past the end (${backend.size})` };
  }
  return undefined;
}

class ReplyWriter {
  readonly #socket: Socket;
  readonly #structured: boolean;

  constructor(socket: Socket, structured: boolean) {
    this.#socket = socket;
    this.#structured = structured;
  }

  /** A successful reply with no payload (or an error). */
  done(handle: Buffer, errno = 0, message = ''): void {
    if (!this.#structured) {
      this.#socket.write(this.#simpleHeader(handle, errno));
      return;
    }
    if (errno === 0) {
      this.#socket.write(this.#chunkHeader(handle, ReplyFlag.DONE, ReplyType.NONE, 0));
      return;
    }
    const text = Buffer.from(message.slice(0, 1024), 'utf8');
    const body = Buffer.alloc(6);
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(text.length, 4);
    this.#socket.cork();
    this.#socket.write(this.#chunkHeader(handle, ReplyFlag.DONE, ReplyType.ERROR, 6 + text.length));
    this.#socket.write(body);
    this.#socket.write(text);
    this.#socket.uncork();
  }

  read(handle: Buffer, offset: number, data: Buffer): void {
    this.#socket.cork();
    if (!this.#structured) {
      this.#socket.write(this.#simpleHeader(handle, 0));
    } else {
      const header = this.#chunkHeader(handle, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 8 + data.length);
      const at = Buffer.alloc(8);
      at.writeBigUInt64BE(BigInt(offset), 0);
      this.#socket.write(header);
      this.#socket.write(at);
    }
    this.#socket.write(data);
    this.#socket.uncork();
  }

  blockStatus(handle: Buffer, contextId: number, extents: { length: number; flags: number }[]): void {
    const body = Buffer.alloc(4 + extents.length * 8);
    body.writeUInt32BE(contextId, 0);
    extents.forEach((extent, i) => {
      body.writeUInt32BE(extent.length, 4 + i * 8);
      body.writeUInt32BE(extent.flags, 8 + i * 8);
    });
    this.#socket.cork();
    this.#socket.write(this.#chunkHeader(handle, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, body.length));
    this.#socket.write(body);
    this.#socket.uncork();
  }

  #simpleHeader(handle: Buffer, errno: number): Buffer {
    const header = Buffer.allocUnsafe(16);
    header.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    header.writeUInt32BE(errno, 4);
    handle.copy(header, 8);
    return header;
  }

  #chunkHeader(handle: Buffer, flags: number, type: number, length: number): Buffer {
    const header = Buffer.allocUnsafe(20);
    header.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    handle.copy(header, 8);
    header.writeUInt32BE(length, 16);
    return header;
  }
}

function errnoOf(err: unknown): number {
  if (err instanceof NbdBackendError) return err.errno;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC') return NbdErrno.ENOSPC;
  if (code === 'EPERM' || code === 'EACCES' || code === 'EROFS') return NbdErrno.EPERM;
  if (code === 'ENOMEM') return NbdErrno.ENOMEM;
  return NbdErrno.EIO;
}

/** Serves requests until the client disconnects (DISC or EOF) or breaks the protocol. */
export async function serveTransmission(
  reader: SocketReader,
  socket: Socket,
  session: NegotiatedSession,
  limits: TransmissionLimits,
  log: Logger,
): Promise<void> {
  const replies = new ReplyWriter(socket, session.structuredReplies);
  const { backend } = session;
  const inFlight = new Set<Promise<void>>();
  let inFlightBytes = 0;
  let slotFreed: (() => void) | undefined;

  const run = (request: Request, payload: Buffer[] | undefined): void => {
    const cost = request.type === Command.READ || request.type === Command.WRITE ? request.length : 0;
    inFlightBytes += cost;
    const work = execute(request, payload).finally(() => {
      inFlight.delete(work);
      inFlightBytes -= cost;
      slotFreed?.();
    });
    inFlight.add(work);
  };

  const execute = async (request: Request, payload: Buffer[] | undefined): Promise<void> => {
    const fua = (request.flags & CommandFlag.FUA) !== 0;
    try {
      switch (request.type) {
        case Command.READ:
          replies.read(request.handle, request.offset, await backend.read(request.offset, request.length));
          return;
        case Command.WRITE:
          await backend.write(request.offset, payload ?? [], fua);
          break;
        case Command.FLUSH:
          await backend.flush();
          break;
        case Command.TRIM:
          await backend.trim(request.offset, request.length, fua);
          break;
        case Command.WRITE_ZEROES:
          if (request.flags & CommandFlag.FAST_ZERO) {
            // Zeroing here costs a full write, so a client asking for fast zeroes is told to do it itself.
            replies.done(request.handle, NbdErrno.ENOTSUP, 'fast zeroing is not supported');
            return;
          }
          await backend.writeZeroes(request.offset, request.length, fua);
          break;
        case Command.BLOCK_STATUS: {
          const length = Math.min(request.length, backend.size - request.offset);
          let extents = await backend.blockStatus(request.offset, length);
          if (request.flags & CommandFlag.REQ_ONE) extents = extents.slice(0, 1);
          replies.blockStatus(request.handle, session.baseAllocationId as number, extents);
          return;
        }
      }
      replies.done(request.handle);
    } catch (err) {
      const errno = errnoOf(err);
      log.warn({ command: commandNames[request.type], offset: request.offset, length: request.length, err: (err as Error).message }, 'NBD request failed');
      replies.done(request.handle, errno, (err as Error).message);
    }
  };

  try {
    for (;;) {
      while (inFlight.size >= limits.maxInFlightRequests || inFlightBytes >= limits.maxInFlightBytes) {
        await new Promise<void>((resolve) => (slotFreed = resolve));
        slotFreed = undefined;
      }
      while (socket.writableLength > limits.maxQueuedReplyBytes && !socket.destroyed) await drained(socket);
      const header = await reader.read(REQUEST_HEADER_BYTES);
      if (header.readUInt32BE(0) !== REQUEST_MAGIC) {
        log.warn({ magic: header.readUInt32BE(0).toString(16) }, 'NBD request with a wrong magic: disconnecting');
        return;
      }
      const request: Request = {
        flags: header.readUInt16BE(4),
        type: header.readUInt16BE(6),
        handle: Buffer.from(header.subarray(8, 16)),
        offset: Number(header.readBigUInt64BE(16)),
        length: header.readUInt32BE(24),
      };
      const problem = validateRequest(request, session, limits);
      if (request.type === Command.WRITE && request.length > 0) {
        if (request.length > limits.maximum) {
          // The payload is too large to read; the protocol allows hanging up here.
          log.warn({ length: request.length }, 'NBD write larger than the maximum block size: disconnecting');
          return;
        }
        const payload = await reader.readChunks(request.length);
        if (problem) {
          log.warn({ command: 'WRITE', why: problem.why }, 'NBD request refused');
          replies.done(request.handle, problem.errno, problem.why);
        } else run(request, payload);
        continue;
      }
      if (problem) {
        log.warn({ command: commandNames[request.type] ?? request.type, why: problem.why }, 'NBD request refused');
        replies.done(request.handle, problem.errno, problem.why);
        continue;
      }
      if (request.type === Command.DISC) return;
      run(request, undefined);
    }
  } finally {
    // Requests already accepted still complete (and reply, if the socket is open) before the connection ends.
    await Promise.allSettled([...inFlight]);
  }
}
