/**
 * A small NBD client: fixed-newstyle handshake with NBD_OPT_GO (falling back
 * to EXPORT_NAME for old servers), structured replies and the base:allocation
 * meta context when the server offers them, then pipelined READ, WRITE,
 * FLUSH, TRIM, WRITE_ZEROES and BLOCK_STATUS whose replies may come back in
 * any order. For tools, tests and the migration planner's "can this host
 * reach this export, and how big is it" probe; QEMU has its own client.
 *
 *   const client = await NbdClient.connect({ type: 'inet', host: '127.0.0.1', port: 10809 }, { exportName: 'vol' });
 *   client.size; await client.read(0, 4096); await client.close();
 *   const { size } = await probeNbdExport(address, 'vol');
 *
 * With `tls`, NBD_OPT_STARTTLS is the first option and the client goes no
 * further without TLS: a server that declines is an error, not a downgrade.
 */
import { connect, isIP, type Socket } from 'node:net';
import { checkServerIdentity, connect as tlsConnect } from 'node:tls';
import { VmferryError, describeError } from '../errors.ts';
import { Deadline, abortError } from '../util/abort.ts';
import {
  NbdDecodeError,
  OPTION_REPLY_HEADER_BYTES,
  decodeBlockStatus,
  decodeErrorPayload,
  decodeInfo,
  decodeMetaContextReply,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  decodeServerReply,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  replyHeaderBytes,
  type BlockSizeLimits,
  type Extent,
} from './codec.ts';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  Command,
  CommandFlag,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  META_CONTEXT_BASE_ALLOCATION,
  NBDMAGIC,
  Option,
  OptionReply,
  ReplyFlag,
  ReplyType,
  TransmissionFlag,
} from './constants.ts';
import { nbdErrnoName } from './errno.ts';
import { ConnectionClosedError, SocketReader } from './socket-reader.ts';
import type { NbdServerAddress as NbdAddress } from './address.ts';


/** TLS with a client certificate: PEM texts, and the name the server's certificate must carry. */
export interface NbdClientTls {
  ca: string;
  cert: string;
  key: string;
  /** The server's certificate must name this (an IP address or DNS name); default: the TCP address's host. Needed over a unix socket. */
  hostname?: string;
}

export interface NbdConnectOptions {
  /** The export to attach to; '' is the server's default export. */
  exportName?: string;
  /** Ask for structured replies (default true; needed for BLOCK_STATUS). */
  structuredReplies?: boolean;
  /** Meta contexts to select (default: base:allocation when structured replies are on). */
  metaContexts?: readonly string[];
  /** Limit for connecting and the whole handshake (default 10 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Start TLS before anything else, and present this certificate. */
  tls?: NbdClientTls;
}

/** What the handshake told us about the export. */
export interface NbdExportInfo {
  name: string;
  size: number;
  /** Raw NBD transmission flags; the booleans below are read from them. */
  transmissionFlags: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canMultiConn: boolean;
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  blockSize: BlockSizeLimits | undefined;
  structuredReplies: boolean;
  /** The meta contexts the server agreed to, by name. */
  metaContexts: string[];
}

export interface MappedExtent extends Extent {
  offset: number;
}

/** A request the server answered with an error; `errno` is the NBD error value (EIO = 5, EINVAL = 22, …). */
export class NbdRequestError extends VmferryError {
  readonly errno: number;

  constructor(command: string, errno: number, message: string) {
    super('VMF_NBD_REQUEST', `NBD ${command} failed: ${nbdErrnoName(errno)}${message ? ` (${message})` : ''}`);
    this.errno = errno;
  }
}

interface Pending {
  command: string;
  type: number;
  offset: number;
  length: number;
  data: Buffer | undefined;
  extents: MappedExtent[] | undefined;
  error: NbdRequestError | undefined;
  resolve: () => void;
  reject: (err: Error) => void;
}

const defaultTimeoutMs = 10_000;
/** Requests larger than this are split even if the server allows more. */
const defaultMaxRequest = 32 * 1024 * 1024;
/** No option reply or non-data reply chunk is allowed to be larger than this. */
const maxControlBytes = 16 * 1024 * 1024;
const commandNames: Record<number, string> = Object.fromEntries(Object.entries(Command).map(([name, value]) => [value, name]));

function protocolError(message: string, cause?: unknown): VmferryError {
  return new VmferryError('VMF_NBD_PROTOCOL', `NBD server broke the protocol: ${message}`, cause === undefined ? undefined : { cause });
}

function describeAddress(address: NbdAddress): string {
  return address.type === 'inet' ? `${address.host}:${address.port}` : address.path;
}

function openSocket(address: NbdAddress, signal: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = address.type === 'inet' ? connect({ host: address.host, port: address.port, noDelay: true }) : connect({ path: address.path });
    const onAbort = (): void => {
      socket.destroy();
      reject(abortError(signal, `connecting to the NBD server at ${describeAddress(address)}`));
    };
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      signal.removeEventListener('abort', onAbort);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (err) => {
      signal.removeEventListener('abort', onAbort);
      reject(new VmferryError('VMF_UNREACHABLE', `cannot connect to the NBD server at ${describeAddress(address)}: ${err.message}`, { cause: err }));
    });
  });
}

const readAheadBytes = 64 * 1024 * 1024;

/** The handshake's state between its steps; socket and reader change at STARTTLS. */
class Handshake {
  reader: SocketReader;
  socket: Socket;
  noZeroes = false;

  constructor(socket: Socket) {
    this.socket = socket;
    this.reader = new SocketReader(socket, readAheadBytes);
  }

  /** NBD_OPT_STARTTLS, then the TLS handshake over the same socket; refused or failed, the connection is of no further use. */
  async startTls(tls: NbdClientTls, address: NbdAddress): Promise<void> {
    const result = await this.option(Option.STARTTLS);
    if (result.error) {
      throw new VmferryError('VMF_NBD_REFUSED', `NBD server ${describeAddress(address)} did not start TLS: ${optionErrorName(result.error.type)}${result.error.message ? ` (${result.error.message})` : ''}`);
    }
    const hostname = tls.hostname ?? (address.type === 'inet' ? address.host : undefined);
    if (hostname === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `TLS to the NBD server at ${describeAddress(address)} needs the hostname its certificate names`);
    this.reader.detach();
    const plain = this.socket;
    const secure = tlsConnect({
      socket: plain,
      ca: tls.ca,
      cert: tls.cert,
      key: tls.key,
      minVersion: 'TLSv1.2',
      // SNI takes DNS names only; the certificate is checked against the name either way.
      ...(isIP(hostname) ? {} : { servername: hostname }),
      checkServerIdentity: (_name, certificate) => checkServerIdentity(hostname, certificate),
    });
    this.socket = secure;
    secure.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      const settle = (err?: Error): void => {
        secure.off('secureConnect', settle);
        secure.off('error', settle);
        secure.off('close', closed);
        if (err) reject(new VmferryError('VMF_NBD_REFUSED', `TLS with the NBD server at ${describeAddress(address)} failed: ${err.message}`, { cause: err }));
        else resolve();
      };
      const closed = (): void => settle(new Error('the connection closed during the TLS handshake'));
      secure.once('secureConnect', settle);
      secure.once('error', settle);
      secure.once('close', closed);
    });
    this.reader = new SocketReader(secure, readAheadBytes);
  }

  async greeting(): Promise<void> {
    const greeting = await this.reader.read(18);
    if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw protocolError('greeting without NBDMAGIC');
    if (greeting.readBigUInt64BE(8) !== IHAVEOPT) throw protocolError('not a newstyle server (oldstyle NBD is not supported)');
    const flags = greeting.readUInt16BE(16);
    if (!(flags & FLAG_FIXED_NEWSTYLE)) throw protocolError('the server does not speak fixed newstyle');
    this.noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
    const clientFlags = Buffer.allocUnsafe(4);
    clientFlags.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | (this.noZeroes ? CLIENT_FLAG_NO_ZEROES : 0), 0);
    this.socket.write(clientFlags);
  }

  /** Sends an option and collects its replies up to the final ACK or error. */
  async option(option: number, data?: Buffer): Promise<{ replies: { type: number; data: Buffer }[]; error?: { type: number; message: string } }> {
    this.socket.write(encodeOption(option, data));
    const replies: { type: number; data: Buffer }[] = [];
    for (;;) {
      const header = decodeOptionReplyHeader(await this.reader.read(OPTION_REPLY_HEADER_BYTES));
      if (header.option !== option) throw protocolError(`reply to option ${header.option} while waiting for ${option}`);
      if (header.length > maxControlBytes) throw protocolError(`option reply of ${header.length} bytes`);
      const body = header.length ? await this.reader.read(header.length) : Buffer.alloc(0);
      if (header.type === OptionReply.ACK) return { replies };
      if (header.type >= 2 ** 31) return { replies, error: { type: header.type, message: body.toString('utf8') } };
      replies.push({ type: header.type, data: body });
    }
  }
}

function optionErrorName(type: number): string {
  const entry = Object.entries(OptionReply).find(([, value]) => value === type);
  return entry ? `NBD_REP_${entry[0]}` : `error ${type}`;
}

export class NbdClient {
  readonly export: NbdExportInfo;
  readonly #socket: Socket;
  readonly #reader: SocketReader;
  readonly #pending = new Map<number, Pending>();
  readonly #inFlight = new Set<Promise<Pending>>();
  readonly #maxRequest: number;
  readonly #baseAllocationId: number | undefined;
  #nextCookie = 1;
  #closed: Error | undefined;
  readonly #receiving: Promise<void>;

  private constructor(socket: Socket, reader: SocketReader, info: NbdExportInfo, baseAllocationId: number | undefined) {
    this.#socket = socket;
    this.#reader = reader;
    this.export = info;
    this.#baseAllocationId = baseAllocationId;
    this.#maxRequest = Math.min(info.blockSize?.maximum ?? defaultMaxRequest, defaultMaxRequest);
    socket.on('error', () => undefined);
    this.#receiving = this.#receive();
  }

  get size(): number {
    return this.export.size;
  }

  /** Connects, negotiates and attaches to an export. */
  static async connect(address: NbdAddress, options: NbdConnectOptions = {}): Promise<NbdClient> {
    const exportName = options.exportName ?? '';
    const deadline = new Deadline(`NBD handshake with ${describeAddress(address)}`, options.timeoutMs ?? defaultTimeoutMs, options.signal);
    let socket: Socket | undefined;
    let hs: Handshake | undefined;
    const onAbort = (): void => {
      hs?.socket.destroy();
      socket?.destroy();
    };
    deadline.signal.addEventListener('abort', onAbort, { once: true });
    try {
      socket = await openSocket(address, deadline.signal);
      hs = new Handshake(socket);
      await hs.greeting();
      if (options.tls) await hs.startTls(options.tls, address);

      let structured = false;
      if (options.structuredReplies ?? true) {
        const result = await hs.option(Option.STRUCTURED_REPLY);
        structured = !result.error;
      }
      const contexts = new Map<string, number>();
      const wanted = options.metaContexts ?? (structured ? [META_CONTEXT_BASE_ALLOCATION] : []);
      if (structured && wanted.length > 0) {
        const result = await hs.option(Option.SET_META_CONTEXT, encodeMetaContextRequest(exportName, wanted));
        if (result.error?.type === OptionReply.ERR_UNKNOWN) throw noExport(address, exportName, result.error.message);
        for (const reply of result.replies) {
          if (reply.type !== OptionReply.META_CONTEXT) continue;
          const context = decodeMetaContextReply(reply.data);
          contexts.set(context.name, context.id);
        }
      }

      let size: number | undefined;
      let flags = 0;
      let blockSize: BlockSizeLimits | undefined;
      const go = await hs.option(Option.GO, encodeInfoRequest(exportName, [Info.BLOCK_SIZE]));
      if (go.error?.type === OptionReply.ERR_UNSUP) {
        // A server from before NBD_OPT_GO: EXPORT_NAME has no error reply, only a hang-up.
        hs.socket.write(encodeOption(Option.EXPORT_NAME, Buffer.from(exportName, 'utf8')));
        const reply = await hs.reader.read(hs.noZeroes ? 10 : 134).catch((err: unknown) => {
          throw err instanceof ConnectionClosedError ? noExport(address, exportName, 'the server hung up on NBD_OPT_EXPORT_NAME') : err;
        });
        size = Number(reply.readBigUInt64BE(0));
        flags = reply.readUInt16BE(8);
      } else if (go.error) {
        if (go.error.type === OptionReply.ERR_UNKNOWN) throw noExport(address, exportName, go.error.message);
        throw new VmferryError('VMF_NBD_REFUSED', `NBD server ${describeAddress(address)} refused export "${exportName}": ${optionErrorName(go.error.type)}${go.error.message ? ` (${go.error.message})` : ''}`);
      } else {
        for (const reply of go.replies) {
          if (reply.type !== OptionReply.INFO) continue;
          const item = decodeInfo(reply.data);
          if (item.type === 'export') {
            size = item.size;
            flags = item.flags;
          } else if (item.type === 'block-size') blockSize = item.limits;
        }
        if (size === undefined) throw protocolError('NBD_OPT_GO finished without NBD_INFO_EXPORT');
      }

      deadline.signal.removeEventListener('abort', onAbort);
      const has = (flag: number): boolean => (flags & flag) !== 0;
      const info: NbdExportInfo = {
        name: exportName,
        size,
        transmissionFlags: flags,
        readOnly: has(TransmissionFlag.READ_ONLY),
        canFlush: has(TransmissionFlag.SEND_FLUSH),
        canFua: has(TransmissionFlag.SEND_FUA),
        canTrim: has(TransmissionFlag.SEND_TRIM),
        canWriteZeroes: has(TransmissionFlag.SEND_WRITE_ZEROES),
        canMultiConn: has(TransmissionFlag.CAN_MULTI_CONN),
        blockSize,
        structuredReplies: structured,
        metaContexts: [...contexts.keys()],
      };
      return new NbdClient(hs.socket, hs.reader, info, contexts.get(META_CONTEXT_BASE_ALLOCATION));
    } catch (err) {
      if (hs && !hs.socket.destroyed && err instanceof VmferryError && (err.code === 'VMF_NBD_NO_EXPORT' || err.code === 'VMF_NBD_REFUSED')) {
        // The server is fine, only the export is not: leave politely, as the protocol asks.
        const leaving = hs.socket;
        leaving.end(encodeOption(Option.ABORT));
        setTimeout(() => leaving.destroy(), 1_000).unref();
      } else {
        hs?.socket.destroy();
        socket?.destroy();
      }
      throw handshakeError(err, deadline.signal, address);
    } finally {
      deadline.signal.removeEventListener('abort', onAbort);
      deadline.dispose();
    }
  }

  /** The exports a server offers (NBD_OPT_LIST), then a polite NBD_OPT_ABORT. */
  static async list(address: NbdAddress, options: Pick<NbdConnectOptions, 'timeoutMs' | 'signal' | 'tls'> = {}): Promise<{ name: string; description: string }[]> {
    const deadline = new Deadline(`NBD export list from ${describeAddress(address)}`, options.timeoutMs ?? defaultTimeoutMs, options.signal);
    let socket: Socket | undefined;
    let hs: Handshake | undefined;
    const onAbort = (): void => {
      hs?.socket.destroy();
      socket?.destroy();
    };
    deadline.signal.addEventListener('abort', onAbort, { once: true });
    try {
      socket = await openSocket(address, deadline.signal);
      hs = new Handshake(socket);
      await hs.greeting();
      if (options.tls) await hs.startTls(options.tls, address);
      const result = await hs.option(Option.LIST);
      if (result.error) throw new VmferryError('VMF_NBD_REFUSED', `NBD server ${describeAddress(address)} refused to list its exports: ${optionErrorName(result.error.type)} (${result.error.message})`);
      const exports = result.replies.filter((r) => r.type === OptionReply.SERVER).map((r) => decodeServerReply(r.data));
      await hs.option(Option.ABORT).catch(() => undefined);
      return exports;
    } catch (err) {
      throw handshakeError(err, deadline.signal, address);
    } finally {
      hs?.socket.destroy();
      socket?.destroy();
      deadline.signal.removeEventListener('abort', onAbort);
      deadline.dispose();
    }
  }

  /** Reads `length` bytes at `offset` (split into several requests above the server's maximum). */
  async read(offset: number, length: number): Promise<Buffer> {
    if (length <= this.#maxRequest) return this.#readOne(offset, length);
    const parts: Promise<Buffer>[] = [];
    for (let at = 0; at < length; at += this.#maxRequest) parts.push(this.#readOne(offset + at, Math.min(this.#maxRequest, length - at)));
    return Buffer.concat(await Promise.all(parts), length);
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    const flags = options.fua ? CommandFlag.FUA : 0;
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += this.#maxRequest) {
      const chunk = data.subarray(at, at + this.#maxRequest);
      parts.push(this.#request(Command.WRITE, flags, offset + at, chunk.length, chunk).then(() => undefined));
    }
    await Promise.all(parts);
  }

  async flush(): Promise<void> {
    await this.#request(Command.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, options: { fua?: boolean } = {}): Promise<void> {
    await this.#ranged(Command.TRIM, options.fua ? CommandFlag.FUA : 0, offset, length);
  }

  /** Zeroes a range; `noHole` asks the server to keep it allocated. */
  async writeZeroes(offset: number, length: number, options: { fua?: boolean; noHole?: boolean } = {}): Promise<void> {
    await this.#ranged(Command.WRITE_ZEROES, (options.fua ? CommandFlag.FUA : 0) | (options.noHole ? CommandFlag.NO_HOLE : 0), offset, length);
  }

  /**
   * base:allocation extents from `offset`: the server may describe less than
   * `length` (call again from the end of the last extent) or, without
   * `reqOne`, more than asked.
   */
  async blockStatus(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<MappedExtent[]> {
    if (this.#baseAllocationId === undefined) {
      throw new VmferryError('VMF_NBD_REFUSED', `the NBD server did not agree to the ${META_CONTEXT_BASE_ALLOCATION} meta context`);
    }
    const pending = await this.#request(Command.BLOCK_STATUS, options.reqOne ? CommandFlag.REQ_ONE : 0, offset, Math.min(length, 2 ** 32 - 512));
    return pending.extents ?? [];
  }

  /** Waits for every request in flight, sends NBD_CMD_DISC and closes the connection. */
  async close(): Promise<void> {
    if (this.#closed) return;
    await Promise.allSettled(this.#inFlight);
    if (!this.#closed) {
      this.#socket.end(encodeRequest({ flags: 0, type: Command.DISC, handle: Buffer.alloc(8), offset: 0, length: 0 }));
      this.#fail(new VmferryError('VMF_NBD_CLOSED', 'the NBD client was closed'));
    }
    await this.#receiving;
  }

  /** Drops the connection at once; requests in flight fail with `err` (or VMF_NBD_CLOSED). */
  destroy(err?: Error): void {
    this.#fail(err ?? new VmferryError('VMF_NBD_CLOSED', 'the NBD client was destroyed'));
    this.#socket.destroy();
  }

  async #ranged(type: number, flags: number, offset: number, length: number): Promise<void> {
    // TRIM and WRITE_ZEROES carry no payload, but a 32-bit length.
    const step = 2 ** 31;
    const parts: Promise<Pending>[] = [];
    for (let at = 0; at < length; at += step) parts.push(this.#request(type, flags, offset + at, Math.min(step, length - at)));
    await Promise.all(parts);
  }

  async #readOne(offset: number, length: number): Promise<Buffer> {
    const pending = await this.#request(Command.READ, 0, offset, length);
    return pending.data ?? Buffer.alloc(0);
  }

  #request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Pending> {
    if (this.#closed) return Promise.reject(this.#closed);
    const cookie = this.#nextCookie;
    this.#nextCookie = this.#nextCookie >= 0xffffffff ? 1 : this.#nextCookie + 1;
    const handle = Buffer.alloc(8);
    handle.writeUInt32BE(cookie, 4);
    const request = new Promise<Pending>((resolve, reject) => {
      const pending: Pending = {
        command: commandNames[type] ?? String(type),
        type,
        offset,
        length,
        // Structured replies may leave holes unsent (OFFSET_HOLE) or arrive in pieces: start from zeros.
        data: type === Command.READ ? (this.export.structuredReplies ? Buffer.alloc(length) : Buffer.allocUnsafe(length)) : undefined,
        extents: undefined,
        error: undefined,
        resolve: () => resolve(pending),
        reject,
      };
      this.#pending.set(cookie, pending);
      const header = encodeRequest({ flags, type, handle, offset, length });
      if (payload) {
        this.#socket.cork();
        this.#socket.write(header);
        this.#socket.write(payload);
        this.#socket.uncork();
      } else this.#socket.write(header);
    });
    this.#inFlight.add(request);
    const forget = (): void => void this.#inFlight.delete(request);
    request.then(forget, forget);
    return request;
  }

  async #receive(): Promise<void> {
    try {
      for (;;) {
        const first = await this.#reader.read(4);
        const rest = await this.#reader.read(replyHeaderBytes(first.readUInt32BE(0)) - 4);
        const reply = decodeReplyHeader(Buffer.concat([first, rest]));
        const cookie = reply.handle.readUInt32BE(4);
        const pending = this.#pending.get(cookie);
        if (!pending || reply.handle.readUInt32BE(0) !== 0) throw protocolError(`reply for unknown handle ${reply.handle.toString('hex')}`);
        if (reply.kind === 'simple') {
          if (reply.errno !== 0) pending.error = new NbdRequestError(pending.command, reply.errno, '');
          else if (pending.type === Command.READ) await this.#readInto(pending, pending.offset, pending.length);
          this.#settle(cookie, pending);
          continue;
        }
        await this.#chunk(pending, reply.type, reply.length);
        if (reply.flags & ReplyFlag.DONE) this.#settle(cookie, pending);
      }
    } catch (err) {
      if (err instanceof ConnectionClosedError) {
        this.#fail(new VmferryError('VMF_NBD_CLOSED', 'the NBD server closed the connection'));
      } else if (err instanceof NbdDecodeError) {
        this.#fail(protocolError(err.message, err));
      } else this.#fail(err instanceof Error ? err : new Error(String(err)));
      this.#socket.destroy();
    }
  }

  async #chunk(pending: Pending, type: number, length: number): Promise<void> {
    switch (type) {
      case ReplyType.NONE:
        if (length !== 0) throw protocolError('NBD_REPLY_TYPE_NONE with a payload');
        return;
      case ReplyType.OFFSET_DATA: {
        if (pending.type !== Command.READ || length < 8) throw protocolError(`data chunk of ${length} bytes for ${pending.command}`);
        const offset = Number((await this.#reader.read(8)).readBigUInt64BE(0));
        await this.#readInto(pending, offset, length - 8);
        return;
      }
      case ReplyType.OFFSET_HOLE: {
        if (pending.type !== Command.READ || length !== 12) throw protocolError(`hole chunk of ${length} bytes for ${pending.command}`);
        const body = await this.#reader.read(12);
        const offset = Number(body.readBigUInt64BE(0));
        const size = body.readUInt32BE(8);
        this.#checkRange(pending, offset, size);
        // pending.data started as zeros; a hole leaves them so.
        return;
      }
      case ReplyType.BLOCK_STATUS: {
        if (pending.type !== Command.BLOCK_STATUS || length > maxControlBytes) throw protocolError(`block status chunk of ${length} bytes for ${pending.command}`);
        const { contextId, extents } = decodeBlockStatus(await this.#reader.read(length));
        if (contextId !== this.#baseAllocationId) return;
        let at = pending.offset;
        pending.extents = extents.map((e) => {
          const mapped = { offset: at, length: e.length, flags: e.flags };
          at += e.length;
          return mapped;
        });
        return;
      }
      default: {
        if (length > maxControlBytes) throw protocolError(`reply chunk of ${length} bytes`);
        const body = length ? await this.#reader.read(length) : Buffer.alloc(0);
        if (type & 0x8000) {
          // ERROR, ERROR_OFFSET, and error types this client does not know: all start with errno + message.
          const error = type === ReplyType.ERROR || type === ReplyType.ERROR_OFFSET || body.length >= 6 ? decodeErrorPayload(body) : { errno: 5, message: '' };
          pending.error ??= new NbdRequestError(pending.command, error.errno, error.message);
        }
        // Unknown non-error chunk types are ignorable, as the protocol says.
      }
    }
  }

  #checkRange(pending: Pending, offset: number, length: number): void {
    if (offset < pending.offset || offset + length > pending.offset + pending.length) {
      throw protocolError(`reply chunk for ${offset}+${length} outside the request ${pending.offset}+${pending.length}`);
    }
  }

  async #readInto(pending: Pending, offset: number, length: number): Promise<void> {
    this.#checkRange(pending, offset, length);
    const target = pending.data as Buffer;
    let at = offset - pending.offset;
    for (const chunk of await this.#reader.readChunks(length)) {
      chunk.copy(target, at);
      at += chunk.length;
    }
  }

  #settle(cookie: number, pending: Pending): void {
    this.#pending.delete(cookie);
    if (pending.error) pending.reject(pending.error);
    else pending.resolve();
  }

  #fail(err: Error): void {
    this.#closed ??= err;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(this.#closed);
  }
}

function noExport(address: NbdAddress, exportName: string, message: string): VmferryError {
  return new VmferryError('VMF_NBD_NO_EXPORT', `NBD server ${describeAddress(address)} has no export "${exportName}"${message ? `: ${message}` : ''}`);
}

function handshakeError(err: unknown, signal: AbortSignal, address: NbdAddress): Error {
  if (signal.aborted) return abortError(signal, `the NBD handshake with ${describeAddress(address)}`);
  if (err instanceof VmferryError) return err;
  if (err instanceof ConnectionClosedError) return new VmferryError('VMF_NBD_CLOSED', `NBD server ${describeAddress(address)} closed the connection during the handshake`);
  if (err instanceof NbdDecodeError) return protocolError(err.message, err);
  return new VmferryError('VMF_NBD_PROTOCOL', `NBD handshake with ${describeAddress(address)} failed: ${describeError(err)}`, { cause: err });
}

/**
 * Connects to an export the way QEMU would (GO, structured replies,
 * base:allocation), reads what the handshake says about it, and disconnects:
 * the answer to "can this host reach this export, and how big is it".
 */
export async function probeNbdExport(address: NbdAddress, exportName: string, options: Pick<NbdConnectOptions, 'timeoutMs' | 'signal' | 'tls'> = {}): Promise<NbdExportInfo> {
  const client = await NbdClient.connect(address, { ...options, exportName });
  await client.close();
  return client.export;
}
