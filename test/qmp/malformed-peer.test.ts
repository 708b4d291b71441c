// Malformed QMP input cannot be provoked from a real QEMU, so these tests use a
// small fake peer on a unix socket; everything else runs against real QEMU.
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.ts';
import type { QmpEventListener } from '../../src/qmp/events.ts';
import { hasCode } from '../../src/errors.ts';
import { makeTempDir } from '../support/temp.ts';

const greeting = { QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'fake' }, capabilities: [] } };

let dir: { path: string; remove(): Promise<void> };
before(async () => {
  dir = await makeTempDir('qmp-fake');
});
after(async () => {
  await dir.remove();
});

/** A fake QMP peer whose behaviour per connection is `script`. */
async function fakePeer(name: string, script: (socket: Socket) => void): Promise<{ path: string; server: Server }> {
  const path = join(dir.path, `${name}.sock`);
  const server = createServer((socket) => {
    // The client hangs up on misbehaving peers; that reset is expected here.
    socket.on('error', () => undefined);
    script(socket);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, server };
}

/** Answers qmp_capabilities, then hands every later command to `onCommand`. */
function qmpScript(onCommand: (socket: Socket, message: { execute: string; id: number }) => void) {
  return (socket: Socket): void => {
    socket.write(`${JSON.stringify(greeting)}\r\n`);
    let buffer = '';
    socket.on('data', (chunk) => {
      buffer += chunk.toString();
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const message = JSON.parse(buffer.slice(0, newline)) as { execute: string; id: number };
        buffer = buffer.slice(newline + 1);
        if (message.execute === 'qmp_capabilities') socket.write(`${JSON.stringify({ return: {}, id: message.id })}\r\n`);
        else onCommand(socket, message);
      }
    });
  };
}

test('a greeting that never comes fails the connect with a timeout naming the socket', async () => {
  const { path, server } = await fakePeer('silent', () => undefined);
  try {
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 300 }), (err: unknown) => {
      assert.ok(hasCode(err, 'VMF_TIMEOUT'), String(err));
      assert.match((err as Error).message, /silent\.sock/);
      return true;
    });
  } finally {
    server.close();
  }
});

test('a socket that is not there fails with VMF_QMP_CONNECT after the retry window', async () => {
  await assert.rejects(QmpClient.connect(join(dir.path, 'absent.sock'), { timeoutMs: 200 }), (err: unknown) => {
    assert.ok(hasCode(err, 'VMF_QMP_CONNECT'), String(err));
    assert.match((err as Error).message, /absent\.sock/);
    return true;
  });
});

test('something other than a greeting is a protocol error', async () => {
  const { path, server } = await fakePeer('nogreeting', (socket) => socket.write('{"hello": "world"}\r\n'));
  try {
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 2000 }), (err: unknown) => {
      assert.ok(hasCode(err, 'VMF_QMP_PROTOCOL'), String(err));
      assert.match((err as Error).message, /expected a QMP greeting/);
      return true;
    });
  } finally {
    server.close();
  }
});

test('an event before the greeting (QEMU 7.2 on a connection it just accepted) is passed over: the connect succeeds and commands work', async () => {
  const { path, server } = await fakePeer('eventfirst', (socket) => {
    socket.write(`${JSON.stringify({ timestamp: { seconds: 1, microseconds: 0 }, event: 'RESUME' })}\r\n`);
    qmpScript((peer, message) => peer.write(`${JSON.stringify({ return: { status: 'running', running: true }, id: message.id })}\r\n`))(socket);
  });
  try {
    const client = await QmpClient.connect(path, { timeoutMs: 2000 });
    assert.deepEqual(await client.execute('query-status'), { status: 'running', running: true });
    client.close();
  } finally {
    server.close();
  }
});

test('garbage JSON rejects pending commands with a protocol error', async () => {
  const { path, server } = await fakePeer('garbage', qmpScript((socket) => socket.write('{not json at all\r\n')));
  try {
    const client = await QmpClient.connect(path, { timeoutMs: 2000 });
    await assert.rejects(client.execute('query-status'), (err: unknown) => {
      assert.ok(hasCode(err, 'VMF_QMP_CLOSED'), String(err));
      assert.match((err as Error).message, /invalid JSON: \{not json at all/);
      return true;
    });
    const reason = await client.closed;
    assert.ok(hasCode(reason, 'VMF_QMP_PROTOCOL'));
  } finally {
    server.close();
  }
});

test('a reply with an unknown id is ignored and the right reply still arrives', async () => {
  const { path, server } = await fakePeer(
    'unknownid',
    qmpScript((socket, message) => {
      socket.write(`${JSON.stringify({ return: { wrong: true }, id: 99999 })}\r\n`);
      socket.write(`${JSON.stringify({ event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } })}\r\n`);
      socket.write(`${JSON.stringify({ return: { status: 'running', running: true }, id: message.id })}\r\n`);
    }),
  );
  try {
    const client = await QmpClient.connect(path, { timeoutMs: 2000 });
    const listener = client.listen();
    assert.deepEqual(await client.execute('query-status'), { status: 'running', running: true });
    const stop = await listener.waitFor('STOP', undefined, { timeoutMs: 1000 });
    assert.equal(stop.timestampUs, 1_000_002);
    listener.close();
    client.close();
  } finally {
    server.close();
  }
});

test('a command QEMU never answers times out, and the connection stays usable', async () => {
  let calls = 0;
  const { path, server } = await fakePeer(
    'slow',
    qmpScript((socket, message) => {
      calls++;
      if (calls > 1) socket.write(`${JSON.stringify({ return: {}, id: message.id })}\r\n`);
    }),
  );
  try {
    const client = await QmpClient.connect(path, { timeoutMs: 2000 });
    await assert.rejects(client.execute('query-status', undefined, { timeoutMs: 200 }), (err: unknown) => hasCode(err, 'VMF_TIMEOUT'));
    assert.deepEqual(await client.execute('query-status'), {});
    client.close();
  } finally {
    server.close();
  }
});

test('a line longer than the limit closes the connection with a protocol error', async () => {
  const { path, server } = await fakePeer(
    'huge',
    qmpScript((socket) => {
      socket.write('"'.padEnd(17 * 1024 * 1024, 'x'));
    }),
  );
  try {
    const client = await QmpClient.connect(path, { timeoutMs: 2000 });
    await assert.rejects(client.execute('query-status'), (err: unknown) => hasCode(err, 'VMF_QMP_CLOSED'));
    assert.ok(hasCode(await client.closed, 'VMF_QMP_PROTOCOL'));
  } finally {
    server.close();
  }
});

test('a listener scoped with `using` is closed when its block is left by a throw: a later wait on it is refused at once', async () => {
  const { path, server } = await fakePeer(
    'scoped',
    qmpScript((socket, message) => {
      socket.write(`${JSON.stringify({ event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 0 } })}\r\n`);
      socket.write(`${JSON.stringify({ return: {}, id: message.id })}\r\n`);
    }),
  );
  const client = await QmpClient.connect(path, { timeoutMs: 2000 });
  try {
    let scoped: QmpEventListener | undefined;
    const waitInScope = async (): Promise<void> => {
      using listener = client.listen();
      scoped = listener;
      await client.execute('stop');
      await listener.waitFor('RESUME', undefined, { timeoutMs: 100 });
    };
    await assert.rejects(waitInScope(), (err: unknown) => hasCode(err, 'VMF_TIMEOUT'));
    await assert.rejects(scoped?.waitFor('RESUME', undefined, { timeoutMs: 1000 }) ?? Promise.resolve(), (err: unknown) => hasCode(err, 'VMF_QMP_CLOSED'));
  } finally {
    client.close();
    server.close();
  }
});
