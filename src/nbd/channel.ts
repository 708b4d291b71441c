/**
 * A server connection's byte stream as the handshake and transmission see it:
 * a socket and its reader. NBD_OPT_STARTTLS replaces both midway (a TLS
 * socket over the plain one), so whoever holds the connection holds this, not
 * the socket.
 */
import type { Socket } from 'node:net';
import { createServer as createTlsServer, type PeerCertificate, type TLSSocket } from 'node:tls';
import { ConnectionClosedError, SocketReader, type ByteReader } from './socket-reader.ts';

/** TLS on an NBD server: mandatory (the protocol's FORCEDTLS), with client certificates. */
export interface NbdServerTls {
  /** PEM: the server's certificate and key, and the CA that must have issued every client's certificate. */
  ca: string;
  cert: string;
  key: string;
  /** Who a client with a certificate of that CA is (for the logs), and why it may not use this server, if it may not. */
  admit(certificate: PeerCertificate): { peer: string; refusal?: string };
}

/** The TLS handshake failed, or ended with a client certificate the CA did not issue. */
export class TlsHandshakeError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'TlsHandshakeError';
  }
}

/** Who a certificate says it is, for a log line about a client we refuse: its subject and issuer as they read. */
function describeCertificate(certificate: PeerCertificate | undefined): string {
  if (!certificate || Object.keys(certificate).length === 0) return 'no client certificate';
  const name = (entries: object | undefined): string => Object.entries(entries ?? {}).map(([key, value]) => `${key}=${String(value)}`).join(',');
  return `subject "${name(certificate.subject)}" issued by "${name(certificate.issuer)}"`;
}

export class NbdChannel {
  socket: Socket;
  reader: ByteReader;
  readonly #plain: Socket;
  readonly #readAheadBytes: number;
  #cancelled: Error | undefined;
  #abortUpgrade: ((err: Error) => void) | undefined;

  /** `reader` reads `socket` (a SocketReader by default); only a SocketReader's socket can be upgraded to TLS. */
  constructor(socket: Socket, readAheadBytes: number, reader: ByteReader = new SocketReader(socket, readAheadBytes)) {
    this.socket = socket;
    this.#plain = socket;
    this.#readAheadBytes = readAheadBytes;
    this.reader = reader;
  }

  get secure(): boolean {
    return this.socket !== this.#plain;
  }

  /** A read waiting now and every later one, and a TLS handshake under way, reject with `error`. */
  cancel(error: Error): void {
    this.#cancelled ??= error;
    this.reader.cancel(error);
    this.#abortUpgrade?.(error);
  }

  destroy(): void {
    this.socket.destroy();
    this.#plain.destroy();
  }

  /**
   * Sends `reply` (STARTTLS's ACK) in plain text, then runs the TLS handshake
   * as the server and carries on over TLS. Resolves with the verified client
   * certificate; rejects with TlsHandshakeError (the connection is then dead).
   * The server's handshake timer covers the TLS handshake too: it destroys the channel.
   */
  async startTls(tls: NbdServerTls, reply: Buffer): Promise<PeerCertificate> {
    // The client's TLS hello may follow our reply at once: from here it waits in the socket for the TLS layer.
    this.reader.detach();
    const plain = this.#plain;
    await new Promise<void>((resolve, reject) => plain.write(reply, (err) => (err ? reject(new ConnectionClosedError(`connection error: ${err.message}`)) : resolve())));
    // A server of one connection, for Node's server-side handshake and certificate check; it never listens.
    // rejectUnauthorized is off only so that the refusal below can say who was refused: nothing is read before it.
    const server = createTlsServer({ ca: tls.ca, cert: tls.cert, key: tls.key, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' });
    const secured = await new Promise<TLSSocket>((resolve, reject) => {
      const fail = (err: Error): void => {
        plain.off('close', closed);
        plain.destroy();
        reject(err instanceof TlsHandshakeError || err === this.#cancelled ? err : new TlsHandshakeError(`TLS handshake failed: ${err.message.trim()}`, { cause: err }));
      };
      const closed = (): void => fail(new ConnectionClosedError('connection closed during the TLS handshake'));
      this.#abortUpgrade = fail;
      plain.once('close', closed);
      server.once('tlsClientError', fail);
      server.once('secureConnection', (socket: TLSSocket) => {
        plain.off('close', closed);
        socket.on('error', () => undefined);
        resolve(socket);
      });
      if (this.#cancelled) fail(this.#cancelled);
      else server.emit('connection', plain);
    }).finally(() => (this.#abortUpgrade = undefined));
    this.socket = secured;
    this.reader = new SocketReader(secured, this.#readAheadBytes);
    if (this.#cancelled) this.reader.cancel(this.#cancelled);
    const certificate = secured.getPeerCertificate();
    if (!secured.authorized) {
      secured.destroy();
      throw new TlsHandshakeError(`client certificate refused (${String(secured.authorizationError)}): ${describeCertificate(certificate)}`);
    }
    return certificate;
  }
}
