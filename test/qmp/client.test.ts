// QMP client against a real QEMU (paused, so nothing of the guest runs).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { join } from 'node:path';
import { QmpCommandError } from '../../src/qmp/client.ts';
import { QemuProcess } from '../../src/qemu/process.ts';
import { hasCode } from '../../src/errors.ts';
import { makeTempDir } from '../support/temp.ts';
import { hostKernel } from '../support/kernel.ts';

describe('QMP client against a real QEMU', () => {
  let dir: { path: string; remove(): Promise<void> };
  let vm: QemuProcess;

  before(async () => {
    dir = await makeTempDir('qmp');
    
    vm = await QemuProcess.start(
      { name: 'qmp-test', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: hostKernel() }, disks: [] },
      { mode: 'paused', runDir: join(dir.path, 'run') },
    );
  });

  after(async () => {
    await vm?.kill();
    await dir?.remove();
  });

  test('reads the greeting and reports QEMU 7 or newer', () => {
    assert.ok(vm.monitor.client.greeting.version.qemu.major >= 7);
  });

  test('runs many commands at once and matches each reply to its command', async () => {
    const calls = Array.from({ length: 40 }, (_, i) =>
      i % 2 === 0
        ? vm.monitor.queryStatus().then((s) => ({ kind: 'status', value: s.status }))
        : vm.monitor.client.execute<{ qemu: { major: number } }>('query-version').then((v) => ({ kind: 'version', value: v.qemu.major })),
    );
    const results = await Promise.all(calls);
    results.forEach((result, i) => {
      if (i % 2 === 0) assert.deepEqual(result, { kind: 'status', value: 'prelaunch' });
      else assert.equal(result.kind, 'version');
    });
  });

  test('turns a QMP error into an error carrying its class and description', async () => {
    await assert.rejects(vm.monitor.blockdevDel('no-such-node'), (err: unknown) => {
      assert.ok(err instanceof QmpCommandError);
      assert.equal(err.code, 'VMF_QMP_COMMAND');
      assert.equal(err.errorClass, 'GenericError');
      assert.match(err.message, /blockdev-del failed: .*no-such-node/);
      return true;
    });
  });

  test('waits for the event a command triggers, with the listener opened first', async () => {
    const listener = vm.monitor.client.listen();
    try {
      await vm.monitor.cont();
      const resume = await listener.waitFor('RESUME', undefined, { timeoutMs: 5000 });
      assert.equal(resume.event, 'RESUME');
      assert.ok(resume.timestampUs > 0);
      await vm.monitor.stop();
      await listener.waitFor('STOP', undefined, { timeoutMs: 5000 });
      assert.equal((await vm.status()).status, 'paused');
    } finally {
      listener.close();
    }
  });

  test('one listener serves several waits at once, each getting the event it asked for', async () => {
    // As when two mirrors are cancelled together: both waits are open before either event comes.
    const listener = vm.monitor.client.listen();
    try {
      const resume = listener.waitFor('RESUME', undefined, { timeoutMs: 5000 });
      const stop = listener.waitFor('STOP', undefined, { timeoutMs: 5000 });
      await vm.monitor.cont();
      await vm.monitor.stop();
      const [resumed, stopped] = await Promise.all([resume, stop]);
      assert.equal(resumed.event, 'RESUME');
      assert.equal(stopped.event, 'STOP');
      assert.ok(stopped.timestampUs >= resumed.timestampUs);
      assert.equal((await vm.status()).status, 'paused');
    } finally {
      listener.close();
    }
  });

  test('a wait that timed out leaves the next matching event to the waits after it', async () => {
    const listener = vm.monitor.client.listen();
    try {
      await assert.rejects(listener.waitFor('RESUME', undefined, { timeoutMs: 50 }), /RESUME/);
      const resume = listener.waitFor('RESUME', undefined, { timeoutMs: 5000 });
      await vm.monitor.cont();
      assert.equal((await resume).event, 'RESUME');
      await vm.monitor.stop();
      await listener.waitFor('STOP', undefined, { timeoutMs: 5000 });
    } finally {
      listener.close();
    }
  });

  test('a wait for an event that never comes times out with a clear error', async () => {
    await assert.rejects(vm.monitor.client.waitFor('SHUTDOWN', undefined, { timeoutMs: 200 }), (err: unknown) => {
      assert.ok(hasCode(err, 'VMF_TIMEOUT'));
      assert.match((err as Error).message, /SHUTDOWN did not finish within 200 ms/);
      return true;
    });
  });

  test('an aborted signal cancels a wait with the signal reason kept', async () => {
    const controller = new AbortController();
    const wait = vm.monitor.client.waitFor('SHUTDOWN', undefined, { signal: controller.signal });
    const reason = new Error('operator cancelled');
    controller.abort(reason);
    await assert.rejects(wait, (err) => err === reason);
  });
});

describe('a QEMU killed mid-command', () => {
  test('rejects the pending command and reports the unexpected death with its signal', async () => {
    const dir = await makeTempDir('qmp-kill');
    
    const vm = await QemuProcess.start(
      { name: 'qmp-kill', vcpus: 1, memoryMiB: 64, boot: { kind: 'kernel', kernel: hostKernel() }, disks: [] },
      { mode: 'paused', runDir: join(dir.path, 'run') },
    );
    try {
      // Freeze QEMU so the command is still unanswered when the process dies.
      process.kill(vm.pid, 'SIGSTOP');
      const pending = vm.status();
      process.kill(vm.pid, 'SIGKILL');
      await assert.rejects(pending, (err: unknown) => {
        assert.ok(hasCode(err, 'VMF_QEMU_EXITED'), `got ${String(err)}`);
        assert.match((err as Error).message, /signal SIGKILL/);
        return true;
      });
      const exit = await vm.exited;
      assert.equal(exit.signal, 'SIGKILL');
      assert.equal(exit.expected, false);
      await assert.rejects(vm.monitor.queryStatus(), (err: unknown) => hasCode(err, 'VMF_QMP_CLOSED'));
    } finally {
      await vm.kill();
      await dir.remove();
    }
  });
});
