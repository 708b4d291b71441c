import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseNicArg } from '../../src/cli/nic-arg.ts';
import { hasCode } from '../../src/errors.ts';

test('--nic takes a bridge and an optional MAC', () => {
  assert.deepEqual(parseNicArg('bridge=vmbr0'), { bridge: 'vmbr0' });
  assert.deepEqual(parseNicArg('bridge=br-lan,mac=52:54:00:AB:CD:EF'), { bridge: 'br-lan', mac: '52:54:00:ab:cd:ef' });
  assert.deepEqual(parseNicArg('mac=52:54:00:00:00:01,bridge=br0'), { bridge: 'br0', mac: '52:54:00:00:00:01' });
});

for (const [arg, problem] of [
  ['vmbr0', /"vmbr0" is not bridge=… or mac=…/],
  ['mac=52:54:00:00:00:01', /names no bridge/],
  ['bridge=a-bridge-name-too-long', /is not a host interface name/],
  ['bridge=br0,mac=52:54:00:00:00', /is not a MAC address/],
  ['bridge=br0,mac=01:00:5e:00:00:01', /multicast/],
  ['bridge=br0,bridge=br1', /gives bridge twice/],
] as const) {
  test(`--nic ${arg} is refused, saying why`, () => {
    assert.throws(() => parseNicArg(arg), (err: unknown) => hasCode(err, 'VMF_INVALID_ARGUMENT') && problem.test((err as Error).message));
  });
}
