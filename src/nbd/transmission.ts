/**
 * The transmission phase: requests are read in order, checked by one
 * validator, run concurrently against the backend, and answered as each
 * finishes (replies may overtake each other, as the protocol allows).
 * In-flight work per connection is bounded in count and bytes, and the bytes
 * of reads and writes, until a read's reply has left, are charged to the
 * server-wide memory budget: past it, no new request is read. A read's data
 * goes into one of the server's reused buffers (buffer-pool.ts), given back
 * once its reply has left; so may a write's payload (reused-buffer-reader.ts),
 * given back once the backend has written it.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  decodeRequest,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeSimpleReplyHeader,
  type Extent,
  type RequestHeader,
} from './codec.ts';
import { Command, CommandFlag, NbdErrno, REQUEST_HEADER_BYTES, REQUEST_MAGIC, ReplyFlag, ReplyType } from './constants.ts';
import { nbdErrnoOf } from './errno.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { BlockSizeLimits, NegotiatedSession } from './handshake.ts';
import type { BudgetAccount } from './memory-budget.ts';
import type { ByteReader } from './socket-reader.ts';

type Request = RequestHeader;

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
  // Zero-length ranges are invalid for every command (nbdkit's rule too): a BLOCK_STATUS of 0 bytes
  // would otherwise be answered with a 0-byte extent, which the protocol forbids and a client may loop on.
  if (request.length === 0) return { errno: NbdErrno.EINVAL, why: 'zero length' };
  if (request.offset + request.length > backend.size) {
    const errno = request.type === Command.WRITE || request.type === Command.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    return { errno, why: `offset ${request.offset} + length ${request.length} is past the end (${backend.size})` };
  }
  return undefined;
}

/**
 * Writes replies, batched: the first reply of an event-loop turn corks the
 * socket and the turn's end uncorks it, so the replies of every request that
 * finished in that turn leave in one writev rather than a system call each.
 */
class ReplyWriter {
  readonly #socket: Socket;
  readonly #structured: boolean;
  #corked = false;
  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };

  constructor(socket: Socket, structured: boolean) {
    this.#socket = socket;
    this.#structured = structured;
  }

  /** A successful reply with no payload (or an error). */
  done(handle: Buffer, errno = 0, message = ''): void {
    this.#batch();
    if (!this.#structured) {
      this.#socket.write(encodeSimpleReplyHeader(handle, errno));
      return;
    }
    if (errno === 0) {
      this.#socket.write(encodeChunkHeader(handle, ReplyFlag.DONE, ReplyType.NONE, 0));
      return;
    }
    const body = encodeErrorPayload(errno, message);
    this.#socket.write(encodeChunkHeader(handle, ReplyFlag.DONE, ReplyType.ERROR, body.length));
    this.#socket.write(body);
  }

  /** `sent` is called once the data has been handed to the kernel (or the socket is gone). */
  read(handle: Buffer, offset: number, data: Buffer, sent: () => void): void {
    this.#batch();
    if (!this.#structured) {
      this.#socket.write(encodeSimpleReplyHeader(handle, 0));
    } else {
      // One buffer for the chunk header and the data chunk's offset prefix.
      const header = encodeChunkHeader(handle, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 8 + data.length, 8);
      header.writeUInt32BE(Math.floor(offset / 2 ** 32), 20);
      header.writeUInt32BE(offset >>> 0, 24);
      this.#socket.write(header);
    }
    this.#socket.write(data, sent);
  }

  blockStatus(handle: Buffer, contextId: number, extents: readonly Extent[]): void {
    this.#batch();
    const body = encodeBlockStatus(contextId, extents);
    this.#socket.write(encodeChunkHeader(handle, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, body.length));
    this.#socket.write(body);
  }

  #batch(): void {
    if (this.#corked) return;
    this.#corked = true;
    this.#socket.cork();
    setImmediate(this.#uncork);
  }
}

/** Serves requests until the client disconnects (DISC or EOF) or breaks the protocol. */
export async function serveTransmission(
  reader: ByteReader,
  socket: Socket,
  session: NegotiatedSession,
  limits: TransmissionLimits,
  budget: BudgetAccount,
  buffers: BufferPool,
  log: Logger,
): Promise<void> {
  const replies = new ReplyWriter(socket, session.structuredReplies);
  const { backend } = session;
  const inFlight = new Set<Promise<void>>();
  let inFlightBytes = 0;
  let slotFreed: (() => void) | undefined;

  /**
   * A read's reply can no longer be sent once the client has gone (or sent EOF:
   * we do not keep half-open sockets), so such reads are not run at all: a flood
   * of reads from clients that hung up would only churn memory. Writes before
   * a DISC still run, as the protocol says.
   */
  const replyUndeliverable = (): boolean => !socket.writable;

  /** Runs a request whose `cost` bytes (READ/WRITE length, else 0) are already taken from the budget. */
  const run = (request: Request, payload: Buffer[] | undefined, cost: number): void => {
    inFlightBytes += cost;
    const work = execute(request, payload, cost).then((replyHoldsBudget) => {
      // The backend is done with a write's payload once its promise settled; pooled chunks serve the next payload.
      if (payload) for (const chunk of payload) buffers.give(chunk);
      inFlight.delete(work);
      inFlightBytes -= cost;
      if (!replyHoldsBudget) budget.release(cost);
      slotFreed?.();
    });
    inFlight.add(work);
  };

  /** Never rejects; resolves true when a read's reply holds on to its budget (and buffer) until it is sent. */
  const execute = async (request: Request, payload: Buffer[] | undefined, cost: number): Promise<boolean> => {
    const fua = (request.flags & CommandFlag.FUA) !== 0;
    try {
      switch (request.type) {
        case Command.READ: {
          const data = buffers.take(request.length);
          try {
            await backend.read(request.offset, data);
          } catch (err) {
            buffers.give(data);
            throw err;
          }
          // Replies a client does not read pile up in our memory, so they count until the kernel has them.
          replies.read(request.handle, request.offset, data, () => {
            budget.release(cost);
            buffers.give(data);
          });
          return true;
        }
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
            return false;
          }
          await backend.writeZeroes(request.offset, request.length, fua, (request.flags & CommandFlag.NO_HOLE) !== 0);
          break;
        case Command.BLOCK_STATUS: {
          const length = Math.min(request.length, backend.size - request.offset);
          let extents = await backend.blockStatus(request.offset, length);
          if (request.flags & CommandFlag.REQ_ONE) extents = extents.slice(0, 1);
          replies.blockStatus(request.handle, session.baseAllocationId as number, extents);
          return false;
        }
      }
      replies.done(request.handle);
    } catch (err) {
      const errno = nbdErrnoOf(err);
      log.warn({ command: commandNames[request.type], offset: request.offset, length: request.length, err: (err as Error).message }, 'NBD request failed');
      replies.done(request.handle, errno, (err as Error).message);
    }
    return false;
  };

  try {
    for (;;) {
      while (inFlight.size >= limits.maxInFlightRequests || inFlightBytes >= limits.maxInFlightBytes) {
        await new Promise<void>((resolve) => (slotFreed = resolve));
        slotFreed = undefined;
      }
      while (socket.writableLength > limits.maxQueuedReplyBytes && !socket.destroyed) await drained(socket);
      const { magic, ...request } = decodeRequest(reader.tryRead(REQUEST_HEADER_BYTES) ?? (await reader.read(REQUEST_HEADER_BYTES)));
      if (magic !== REQUEST_MAGIC) {
        log.warn({ magic: magic.toString(16) }, 'NBD request with a wrong magic: disconnecting');
        return;
      }
      const problem = validateRequest(request, session, limits);
      if (request.type === Command.WRITE && request.length > 0) {
        if (request.length > limits.maximum) {
          // The payload is too large to read; the protocol allows hanging up here.
          log.warn({ length: request.length }, 'NBD write larger than the maximum block size: disconnecting');
          return;
        }
        // The payload is held from the moment it is read, so it is paid for first; waiting here is the backpressure.
        if (!budget.tryAcquire(request.length)) await budget.acquire(request.length);
        const payload = reader.tryReadChunks(request.length) ?? (await reader.readChunks(request.length));
        if (problem) {
          for (const chunk of payload) buffers.give(chunk);
          budget.release(request.length);
          log.warn({ command: 'WRITE', why: problem.why }, 'NBD request refused');
          replies.done(request.handle, problem.errno, problem.why);
        } else run(request, payload, request.length);
        continue;
      }
      if (problem) {
        log.warn({ command: commandNames[request.type] ?? request.type, why: problem.why }, 'NBD request refused');
        replies.done(request.handle, problem.errno, problem.why);
        continue;
      }
      if (request.type === Command.DISC) return;
      if (request.type !== Command.READ) {
        run(request, undefined, 0);
        continue;
      }
      if (replyUndeliverable()) continue;
      if (budget.tryAcquire(request.length)) {
        run(request, undefined, request.length);
        continue;
      }
      await budget.acquire(request.length);
      if (replyUndeliverable()) budget.release(request.length);
      else run(request, undefined, request.length);
    }
  } finally {
    // Requests already accepted still complete (and reply, if the socket is open) before the connection ends.
    await Promise.allSettled([...inFlight]);
  }
}
