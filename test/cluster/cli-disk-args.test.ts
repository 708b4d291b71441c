// `vmferry vm create` with a user's disk images: what the CLI asks the
// controller for (a stand-in controller records the request), and the clear
// errors it gives for arguments it cannot make sense of.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { runVmferry, startRecordingController, type CliResult, type RecordingController } from '../support/cli.ts';

let controller: RecordingController;
let requests: unknown[] = [];

before(async () => {
  controller = await startRecordingController((body) => {
    const { host, vm } = body as { host: string; vm: { name: string } };
    return { status: 201, json: { name: vm.name, host } };
  });
  requests = controller.requests;
});

after(() => controller.close());

function vmferry(...args: string[]): Promise<CliResult> {
  return runVmferry(controller.url, args);
}

test('import=, base= and --boot disk:ID become the request the agent acts on', async () => {
  requests.length = 0;
  const result = await vmferry(
    'vm', 'create', 'web', '--host', 'A', '--storage-nbd', '10.0.0.1:10809',
    '--local-disk', 'root:import=/srv/images/web.qcow2',
    '--local-disk', 'sys:base=debian-12:20G',
    '--local-disk', 'tmp:base=debian-12',
    '--local-disk', 'scratch:1G',
    '--boot', 'disk:root',
  );
  assert.equal(result.code, 0, result.stderr);
  const server = { type: 'inet', host: '10.0.0.1', port: 10809 };
  assert.deepEqual(requests, [
    {
      host: 'A',
      vm: {
        name: 'web',
        memoryMiB: 256,
        vcpus: 1,
        boot: { kind: 'disk', diskId: 'root' },
        disks: [
          { id: 'root', local: { import: '/srv/images/web.qcow2' } },
          { id: 'sys', local: { base: 'debian-12', baseServer: server, sizeBytes: 20 * 1024 ** 3 } },
          { id: 'tmp', local: { base: 'debian-12', baseServer: server } },
          { id: 'scratch', local: { sizeBytes: 1024 ** 3 } },
        ],
      },
    },
  ]);
});

const badArguments: { args: string[]; message: RegExp }[] = [
  { args: ['--local-disk', 'root:import=web.qcow2', '--boot', 'disk:root'], message: /--local-disk root:import= needs an absolute path on the VM's host \(got "web\.qcow2"\)/ },
  { args: ['--local-disk', 'root:base=', '--boot', 'disk:root'], message: /--local-disk root:base= needs a shared volume name/ },
  { args: ['--local-disk', 'root:1G', '--boot', 'disk:data'], message: /--boot disk:data names no disk of this VM/ },
  { args: ['--local-disk', 'root:1G', '--boot', 'cdrom'], message: /--boot must be disk:ID \(got "cdrom"\)/ },
  { args: ['--local-disk', 'root:1G', '--boot', 'disk:root', '--test-guest'], message: /say what to boot once: --test-guest and --boot were both given/ },
  { args: ['--test-guest', '--memory', 'lots'], message: /--memory must be a positive number \(got "lots"\)/ },
  { args: ['--test-guest', '--storage-nbd', 'storage'], message: /--storage-nbd must be HOST:PORT \(got "storage"\)/ },
];

for (const { args, message } of badArguments) {
  test(`vm create ${args.join(' ')}: refused before anything is asked of the controller`, async () => {
    requests.length = 0;
    const result = await vmferry('vm', 'create', 'web', '--host', 'A', ...args);
    assert.notEqual(result.code, 0);
    assert.match(result.stderr, message);
    assert.deepEqual(requests, []);
  });
}

test('migrate --copy-mode takes only the two modes, and says so before asking the controller', async () => {
  requests.length = 0;
  const result = await vmferry('migrate', 'web', '--to', 'B', '--copy-mode', 'turbo');
  assert.equal(result.code, 1);
  assert.match(result.stderr, /option '--copy-mode <mode>' argument 'turbo' is invalid\. Allowed choices are write-blocking, background/);
  assert.deepEqual(requests, []);
});

test('migrate --ram-mode: help shows the modes and the default, the choice reaches the controller, and a wrong one is refused first', async () => {
  const help = await vmferry('migrate', '--help');
  assert.match(help.stdout.replace(/\s+/g, ' '), /--ram-mode <mode> .*\(choices: "live", "postcopy", "stop-and-copy", default: "live"\)/);
  requests.length = 0;
  await vmferry('migrate', 'web', '--to', 'B', '--ram-mode', 'postcopy', '--dry-run');
  assert.equal(requests.length, 1);
  const sent = requests[0] as Record<string, unknown>;
  assert.deepEqual(sent, { ...sent, vm: 'web', to: 'B', dryRun: true, ramMode: 'postcopy' });
  requests.length = 0;
  const wrong = await vmferry('migrate', 'web', '--to', 'B', '--ram-mode', 'precopy');
  assert.equal(wrong.code, 1);
  assert.match(wrong.stderr, /option '--ram-mode <mode>' argument 'precopy' is invalid\. Allowed choices are live, postcopy, stop-and-copy/);
  const mixed = await vmferry('migrate', 'web', '--to', 'B', '--ram-mode', 'stop-and-copy', '--allow-postcopy');
  assert.equal(mixed.code, 1);
  assert.match(mixed.stderr, /--allow-postcopy switches a live migration to post-copy; it does not go with --ram-mode stop-and-copy/);
  assert.deepEqual(requests, []);
});
