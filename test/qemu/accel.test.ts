// Which accelerator a host uses: KVM only when a probe guest really runs under
// it. This machine's /dev/kvm opens but guests hang under it, so the real probe
// must choose TCG here; stand-in QEMUs (a wrapper that swaps KVM for TCG, one
// that hangs, one that fails) cover every other answer on any machine.
import assert from 'node:assert/strict';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { hasCode } from '../../src/errors.ts';
import { chooseAccelerator, defaultKvmProbeTimeoutMs, parseAccelMode, probeBootSector, probeKvm } from '../../src/qemu/accel.ts';
import { makeTempDir } from '../support/temp.ts';

let temp: { path: string; remove(): Promise<void> };
/** Runs the real QEMU with -accel tcg wherever the probe asks for kvm: a host whose KVM works, as far as the probe can tell. */
let workingKvm: string;
let hangingQemu: string;
let failingQemu: string;

async function script(name: string, body: string): Promise<string> {
  const path = join(temp.path, name);
  await writeFile(path, `#!/bin/sh\n${body}\n`);
  await chmod(path, 0o755);
  return path;
}

before(async () => {
  temp = await makeTempDir('accel');
  workingKvm = await script('qemu-kvm-works', 'for a; do shift; [ "$a" = kvm ] && a=tcg; set -- "$@" "$a"; done\nexec qemu-system-x86_64 "$@"');
  hangingQemu = await script('qemu-hangs', 'exec sleep 60');
  failingQemu = await script('qemu-fails', 'echo "qemu-system-x86_64: Could not access KVM kernel module: Permission denied" >&2\necho "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied" >&2\nexit 1');
});

after(() => temp.remove());

test('the probe boot sector is one 512-byte sector with the boot signature and the marker', () => {
  const sector = probeBootSector();
  assert.equal(sector.length, 512);
  assert.deepEqual([...sector.subarray(510)], [0x55, 0xaa]);
  assert.ok(sector.toString('latin1').includes('VMFERRY-KVM-PROBE-OK'));
});

test('auto picks KVM when the probe guest prints its marker (here under TCG, through a wrapper)', async () => {
  const choice = await chooseAccelerator('auto', { binary: workingKvm, kvmDevice: '/dev/null', timeoutMs: 10_000 });
  assert.equal(choice.accelerator, 'kvm');
  assert.match(choice.reason, /^a probe guest ran under KVM in \d+ ms$/);
});

test('auto falls back to TCG when the probe guest hangs, within the probe bound, and says so', async () => {
  const started = Date.now();
  const choice = await chooseAccelerator('auto', { binary: hangingQemu, kvmDevice: '/dev/null', timeoutMs: 1_000 });
  assert.deepEqual(choice, { accelerator: 'tcg', reason: 'KVM unusable: a probe guest started under KVM did not run within 1.0 s (it hung)' });
  assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
});

test('auto falls back to TCG when QEMU cannot start under KVM, with QEMU\'s own words', async () => {
  const choice = await chooseAccelerator('auto', { binary: failingQemu, kvmDevice: '/dev/null' });
  assert.equal(choice.accelerator, 'tcg');
  assert.match(choice.reason, /^KVM unusable: QEMU exited \(code 1, signal null\) before a probe guest ran under KVM: .*Could not access KVM kernel module: Permission denied/);
});

test('no KVM device: TCG with that reason, and --accel kvm refuses naming it', async () => {
  assert.deepEqual(await probeKvm({ kvmDevice: '/nonexistent/kvm' }), {
    ok: false,
    reason: 'no /nonexistent/kvm (the kvm module is not loaded, or the CPU has no virtualization)',
  });
  await assert.rejects(chooseAccelerator('kvm', { kvmDevice: '/nonexistent/kvm' }), (err: unknown) => {
    assert.ok(hasCode(err, 'VMF_ACCEL_UNAVAILABLE'));
    assert.match(err.message, /^--accel kvm: KVM cannot run guests on this host: no \/nonexistent\/kvm .*; start the agent with --accel auto or --accel tcg$/);
    return true;
  });
});

test('--accel tcg does not probe at all', async () => {
  const started = Date.now();
  // A QEMU that hangs would cost the probe bound, were it asked.
  const choice = await chooseAccelerator('tcg', { binary: hangingQemu, kvmDevice: '/dev/null', timeoutMs: 10_000 });
  assert.deepEqual(choice, { accelerator: 'tcg', reason: 'chosen with --accel tcg (KVM not probed)' });
  assert.ok(Date.now() - started < 500, `took ${Date.now() - started} ms`);
});

// Real QEMU, real /dev/kvm: each takes the probe bound (3 s) on this machine, where guests hang under KVM.
test(`on this machine auto chooses TCG within the ${defaultKvmProbeTimeoutMs / 1000} s probe bound, and says why`, async () => {
  const started = Date.now();
  const choice = await chooseAccelerator('auto');
  assert.equal(choice.accelerator, 'tcg', `this machine's KVM hangs guests; the probe said: ${choice.reason}`);
  assert.match(choice.reason, /^KVM unusable: /);
  assert.ok(Date.now() - started < defaultKvmProbeTimeoutMs + 2_000, `took ${Date.now() - started} ms`);
});

test('on this machine --accel kvm is refused with the probe failure named', async () => {
  await assert.rejects(chooseAccelerator('kvm'), (err: unknown) => {
    assert.ok(hasCode(err, 'VMF_ACCEL_UNAVAILABLE'));
    assert.match(err.message, /^--accel kvm: KVM cannot run guests on this host: .*(did not run within 3\.0 s|no \/dev\/kvm|cannot open \/dev\/kvm|QEMU exited)/);
    return true;
  });
});

test('--accel takes auto, kvm or tcg and nothing else', () => {
  assert.equal(parseAccelMode('kvm', '--accel'), 'kvm');
  assert.throws(() => parseAccelMode('hvf', '--accel'), /^VmferryError: --accel must be one of auto, kvm, tcg \(got "hvf"\)$/);
});
