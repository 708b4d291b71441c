/** `vm create --nic bridge=BR[,mac=MAC]`: one NIC of the VM, checked before anything is sent. */
import { VmferryError } from '../errors.ts';
import type { CreateVmRequest } from '../api/agent-types.ts';
import { bridgePattern } from '../qemu/spec.ts';

export type NicRequest = NonNullable<CreateVmRequest['nics']>[number];

export function parseNicArg(value: string): NicRequest {
  const fields = new Map<string, string>();
  for (const part of value.split(',')) {
    const eq = part.indexOf('=');
    const key = eq > 0 ? part.slice(0, eq) : '';
    if (key !== 'bridge' && key !== 'mac') throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic takes bridge=BRIDGE[,mac=MAC] (got "${value}": "${part}" is not bridge=… or mac=…)`);
    if (fields.has(key)) throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic "${value}" gives ${key} twice`);
    fields.set(key, part.slice(eq + 1));
  }
  const bridge = fields.get('bridge');
  if (!bridge) throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic "${value}" names no bridge: bridge=BRIDGE is required`);
  if (!bridgePattern.test(bridge)) throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic bridge "${bridge}" is not a host interface name (1-15 of A-Z a-z 0-9 . - _)`);
  const mac = fields.get('mac');
  if (mac === undefined) return { bridge };
  if (!/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(mac)) throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic mac "${mac}" is not a MAC address such as 52:54:00:12:34:56`);
  if (parseInt(mac.slice(0, 2), 16) & 1) throw new VmferryError('VMF_INVALID_ARGUMENT', `--nic mac "${mac}" is a multicast address; a NIC needs a unicast one`);
  return { bridge, mac: mac.toLowerCase() };
}
