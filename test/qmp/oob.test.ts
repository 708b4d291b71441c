// Out-of-band QMP: negotiated when QEMU offers it, `exec-oob` answered while
// the main loop is busy, replies that overtake earlier ones, and an in-band
// queue that never fills QEMU's (which would stop QEMU reading, OOB
// included). Protocol corners on a fake peer; the main point on a real QEMU.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { open } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { hostKernel } from '../support/kernel.ts';
import { makeTempDir } from '../support/temp.ts';

interface Command {
  execute?: string;
  'exec-oob'?: string;
  arguments?: Record<string, unknown>;
  id: number;
}

let dir: { path: string; remove(): Promise<void> };
before(async () => {
  dir = await makeTempDir('qmp-oob');
});
after(async () => {
  await dir.remove();
});

function greeting(capabilities: string[]): string {
  return `${JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'fake' }, capabilities } })}\r\n`;
}

function reply(socket: Socket, id: number, value: unknown = {}): void {
  socket.write(`${JSON.stringify({ return: value, id })}\r\n`);
}

/** A fake QMP peer offering `capabilities`; every message after the greeting goes to `onCommand`. */
async function fakePeer(name: string, capabilities: string[], onCommand: (socket: Socket, command: Command) => void): Promise<Server & { path: string }> {
  const path = join(dir.path, `${name}.sock`);
  const server = createServer((socket) => {
    socket.on('error', () => undefined);
    socket.write(greeting(capabilities));
    let buffer = '';
    socket.on('data', (chunk) => {
      buffer += chunk.toString();
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const command = JSON.parse(buffer.slice(0, newline)) as Command;
        buffer = buffer.slice(newline + 1);
        onCommand(socket, command);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return Object.assign(server, { path });
}

describe('out-of-band QMP against a fake peer', () => {
  test('OOB is switched on when the greeting offers it, and only then', async () => {
    const negotiated: (Record<string, unknown> | undefined)[] = [];
    const answer = (socket: Socket, command: Command): void => {
      if (command.execute === 'qmp_capabilities') negotiated.push(command.arguments);
      reply(socket, command.id);
    };
    const withOob = await fakePeer('offers', ['oob'], answer);
    const without = await fakePeer('plain', [], answer);
    try {
      const a = await QmpClient.connect(withOob.path, { timeoutMs: 2000 });
      const b = await QmpClient.connect(without.path, { timeoutMs: 2000 });
      assert.deepEqual(negotiated, [{ enable: ['oob'] }, undefined]);
      assert.equal(a.oobEnabled, true);
      assert.equal(b.oobEnabled, false);
      await assert.rejects(b.execute('yank', { instances: [] }, { oob: true }), (err: unknown) => {
        assert.ok(hasCode(err, 'VMF_QMP_PROTOCOL'), String(err));
        assert.match((err as Error).message, /yank cannot be sent out of band/);
        return true;
      });
      a.close();
      b.close();
    } finally {
      withOob.close();
      without.close();
    }
  });

  test('an OOB reply that overtakes an in-band one reaches its own caller', async () => {
    let held: { socket: Socket; id: number } | undefined;
    const peer = await fakePeer('overtake', ['oob'], (socket, command) => {
      if (command.execute === 'qmp_capabilities') reply(socket, command.id);
      else if (command.execute === 'query-status') held = { socket, id: command.id };
      else if (command['exec-oob'] === 'query-yank') {
        reply(socket, command.id, [{ type: 'migration' }]);
        if (held) reply(held.socket, held.id, { status: 'running', running: true });
      }
    });
    try {
      const client = await QmpClient.connect(peer.path, { timeoutMs: 2000 });
      const order: string[] = [];
      const status = client.execute('query-status').then((value) => {
        order.push('query-status');
        return value;
      });
      const yankable = client.execute('query-yank', undefined, { oob: true }).then((value) => {
        order.push('query-yank');
        return value;
      });
      assert.deepEqual(await Promise.all([status, yankable]), [{ status: 'running', running: true }, [{ type: 'migration' }]]);
      assert.deepEqual(order, ['query-yank', 'query-status']);
      client.close();
    } finally {
      peer.close();
    }
  });

  test('in-band commands QEMU holds stay below its queue limit, so an OOB command is always read', async () => {
    const received: Command[] = [];
    let peerSocket: Socket | undefined;
    const peer = await fakePeer('queue', ['oob'], (socket, command) => {
      peerSocket = socket;
      if (command.execute === 'qmp_capabilities') return reply(socket, command.id);
      received.push(command);
      if (command['exec-oob']) reply(socket, command.id);
      else if (received.length > 8) reply(socket, command.id, 'late');
    });
    const client = await QmpClient.connect(peer.path, { timeoutMs: 2000 });
    try {
      // QEMU's main loop is stuck: nothing in-band is answered, and the callers give up.
      const stuck = Array.from({ length: 12 }, () => client.execute('query-status', undefined, { timeoutMs: 300 }));
      assert.deepEqual(await client.execute('yank', { instances: [{ type: 'migration' }] }, { oob: true, timeoutMs: 2000 }), {});
      for (const result of await Promise.allSettled(stuck)) {
        assert.ok(result.status === 'rejected' && hasCode(result.reason, 'VMF_TIMEOUT'), String(result.status));
      }
      const inBand = received.filter((c) => c.execute);
      assert.equal(inBand.length, 7, 'seven in-band commands sent; the five held back expired unsent');
      assert.equal(received.findIndex((c) => c['exec-oob']), 7, 'the OOB command went out at once, behind them');

      // QEMU still holds the seven the callers gave up on; each late answer frees room for one more.
      const next = client.execute('query-status', undefined, { timeoutMs: 2000 });
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(received.length, 8, 'no room yet');
      reply(peerSocket as Socket, (inBand[0] as Command).id);
      assert.equal(await next, 'late');
      assert.equal(received.length, 9);
    } finally {
      client.close();
      peer.close();
    }
  });

  test('answered() waits for the in-band commands sent before it, one given up on included, and for none sent after', async () => {
    const held = new Map<string, number>();
    let peerSocket: Socket | undefined;
    const peer = await fakePeer('answered', ['oob'], (socket, command) => {
      peerSocket = socket;
      if (command.execute === 'qmp_capabilities') reply(socket, command.id);
      else if (command.execute) held.set(command.execute, command.id);
    });
    const client = await QmpClient.connect(peer.path, { timeoutMs: 2000 });
    try {
      // The caller gives up on blockdev-add (an abort, a timeout); QEMU is still running it.
      await assert.rejects(client.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n' }, { timeoutMs: 100 }));
      let settled = false;
      const answered = client.answered().then(() => {
        settled = true;
      });
      const later = client.execute('query-status', undefined, { timeoutMs: 2000 });
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(settled, false, 'QEMU has not answered blockdev-add yet');
      assert.deepEqual(client.unanswered, ['blockdev-add', 'query-status']);
      reply(peerSocket as Socket, held.get('blockdev-add') as number);
      await answered;
      assert.deepEqual(client.unanswered, ['query-status'], 'a command sent after answered() was called is not waited for');
      reply(peerSocket as Socket, held.get('query-status') as number);
      await later;
    } finally {
      client.close();
      peer.close();
    }
  });
});

describe('out-of-band QMP against a real QEMU', () => {
  let vm: QemuProcess;

  before(async () => {
    vm = await QemuProcess.start(
      { name: 'qmp-oob', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: hostKernel() }, disks: [] },
      { mode: 'paused', runDir: join(dir.path, 'run') },
    );
  });
  after(async () => {
    await vm?.kill();
  });

  test('QEMU offers OOB on our monitor and the client switches it on', () => {
    assert.ok(vm.monitor.client.greeting.capabilities.includes('oob'));
    assert.equal(vm.monitor.client.oobEnabled, true);
  });

  test('an OOB command is answered while the main loop is stuck, ahead of the in-band ones sent before it', async () => {
    // blkdebug reads its config file in the main loop; opening a FIFO for reading blocks until a writer comes.
    // QEMU's own tests (tests/qtest/qmp-test.c) block the main loop the same way.
    const fifo = join(dir.path, 'blkdebug.fifo');
    execFileSync('mkfifo', [fifo]);
    const client = vm.monitor.client;
    const order: string[] = [];
    const stuck = client
      .execute('blockdev-add', { driver: 'blkdebug', 'node-name': 'stuck', config: fifo, image: { driver: 'null-co' } }, { timeoutMs: 20_000 })
      .then(() => order.push('blockdev-add'));
    const queued = Array.from({ length: 10 }, (_, i) => client.execute('query-status', undefined, { timeoutMs: 20_000 }).then(() => order.push(`query-status ${i}`)));
    const started = Date.now();
    const yankable = await client.execute<{ type: string }[]>('query-yank', undefined, { oob: true, timeoutMs: 5_000 });
    const oobMs = Date.now() - started;
    order.push('query-yank');
    assert.ok(yankable.some((i) => i.type === 'chardev'), JSON.stringify(yankable));
    assert.deepEqual(order, ['query-yank'], 'nothing in-band was answered before the OOB command');
    assert.ok(oobMs < 2_000, `answered in ${oobMs} ms`);

    // A writer that closes at once gives blkdebug an empty config: the main loop goes on.
    await (await open(fifo, 'w')).close();
    await Promise.all([stuck, ...queued]);
    assert.deepEqual(order.slice(1), ['blockdev-add', ...Array.from({ length: 10 }, (_, i) => `query-status ${i}`)]);
    await vm.monitor.blockdevDel('stuck');
  });
});
