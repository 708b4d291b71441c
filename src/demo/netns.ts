/**
 * Test hosts in their own network namespaces, joined by a bridge: each host
 * has a private address that exists only on links vmferry created itself.
 * Optionally the first two hosts also get a direct veth pair of their own, a
 * "migration network" that can be cut while the bridge (controller, storage)
 * stays up. Needs root and iproute2.
 */
import { runProgram } from '../util/run.ts';

export interface NamespaceHost {
  name: string;
  namespace: string;
  address: string;
  /** Address on the direct host-to-host link, when there is one. */
  linkAddress?: string;
  linkDevice?: string;
}

export interface NamespaceNetwork {
  /** Address of the bridge: services in the root namespace listen here. */
  gateway: string;
  hosts: NamespaceHost[];
  /** Takes the direct host-to-host link down (both ends) or up again. */
  setHostLink(up: boolean): Promise<void>;
  remove(): Promise<void>;
}

export interface NamespaceNetworkOptions {
  /** First three octets of the bridge's /24 (default 10.213.7). */
  subnet?: string;
  /** First three octets of a direct link's /24 between the first two hosts. */
  hostLinkSubnet?: string;
}

async function ip(...args: string[]): Promise<void> {
  await runProgram('ip', args, { timeoutMs: 10_000 });
}

/**
 * Removes what an earlier run that was killed left under one of our names. A
 * namespace lives on while any process is in it, and with it the veth pair
 * whose outer end then blocks the next `ip link add`: so the processes in it
 * (ours: the name carries this cluster's prefix) go first.
 */
async function removeStaleNamespace(namespace: string, ...outerLinks: string[]): Promise<void> {
  const pids = await runProgram('ip', ['netns', 'pids', namespace], { timeoutMs: 10_000 }).then(
    (out) => out.split('\n').map(Number).filter((pid) => Number.isSafeInteger(pid) && pid > 0),
    () => [],
  );
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone already.
    }
  }
  await ip('netns', 'del', namespace).catch(() => undefined);
  for (const link of outerLinks) await ip('link', 'del', link).catch(() => undefined);
}

export function canUseNamespaces(): boolean {
  return process.getuid?.() === 0;
}

/** Creates one namespace per host name (prefix-a, prefix-b, …), all on one bridge. */
export async function createNamespaceNetwork(prefix: string, hostNames: string[], options: NamespaceNetworkOptions = {}): Promise<NamespaceNetwork> {
  const subnet = options.subnet ?? '10.213.7';
  const bridge = `${prefix}br`;
  const created: (() => Promise<void>)[] = [];
  const remove = async (): Promise<void> => {
    for (const undo of created.reverse()) await undo().catch(() => undefined);
  };
  try {
    // Leftovers of an earlier run that was killed go first.
    await ip('link', 'del', bridge).catch(() => undefined);
    await ip('link', 'add', bridge, 'type', 'bridge');
    created.push(() => ip('link', 'del', bridge));
    await ip('addr', 'add', `${subnet}.1/24`, 'dev', bridge);
    await ip('link', 'set', bridge, 'up');
    const hosts: NamespaceHost[] = [];
    for (const [index, name] of hostNames.entries()) {
      const namespace = `${prefix}-${name.toLowerCase()}`;
      const outside = `${prefix}${index}h`;
      const inside = `${prefix}${index}n`;
      const address = `${subnet}.${index + 2}`;
      await removeStaleNamespace(namespace, outside);
      await ip('netns', 'add', namespace);
      created.push(() => ip('netns', 'del', namespace));
      await ip('link', 'add', outside, 'type', 'veth', 'peer', 'name', inside);
      created.push(() => ip('link', 'del', outside));
      await ip('link', 'set', inside, 'netns', namespace);
      await ip('link', 'set', outside, 'master', bridge);
      await ip('link', 'set', outside, 'up');
      await ip('-n', namespace, 'addr', 'add', `${address}/24`, 'dev', inside);
      await ip('-n', namespace, 'link', 'set', inside, 'up');
      await ip('-n', namespace, 'link', 'set', 'lo', 'up');
      hosts.push({ name, namespace, address });
    }
    const [first, second] = hosts;
    if (options.hostLinkSubnet && first && second) {
      first.linkDevice = `${prefix}l0`;
      second.linkDevice = `${prefix}l1`;
      await ip('-n', first.namespace, 'link', 'add', first.linkDevice, 'type', 'veth', 'peer', 'name', second.linkDevice, 'netns', second.namespace);
      for (const [index, host] of [first, second].entries()) {
        host.linkAddress = `${options.hostLinkSubnet}.${index + 1}`;
        await ip('-n', host.namespace, 'addr', 'add', `${host.linkAddress}/24`, 'dev', host.linkDevice as string);
        await ip('-n', host.namespace, 'link', 'set', host.linkDevice as string, 'up');
      }
    }
    const setHostLink = async (up: boolean): Promise<void> => {
      for (const host of [first, second]) {
        if (host?.linkDevice) await ip('-n', host.namespace, 'link', 'set', host.linkDevice, up ? 'up' : 'down');
      }
    };
    return { gateway: `${subnet}.1`, hosts, setHostLink, remove };
  } catch (err) {
    await remove();
    throw err;
  }
}

export interface GuestSegment {
  /** The bridge every host has, for the VMs' NICs (`--nic bridge=…`). */
  bridge: string;
  /** The namespace of the client that pings the VMs and holds TCP connections to them. */
  clientNamespace: string;
  clientAddress: string;
  /** First three octets of the segment's /24: VMs take addresses from .10 on. */
  subnet: string;
  remove(): Promise<void>;
}

/**
 * One L2 segment for the guests of `hosts`: a bridge in each host's namespace,
 * uplinked by a veth pair to a "switch" bridge in a namespace of its own, and a
 * client namespace on that switch. A guest that moves from one host to another
 * keeps its address; only the switch's MAC table has to learn where it went.
 * Nothing of it is in the root namespace.
 */
export async function createGuestSegment(prefix: string, hosts: NamespaceHost[], options: { subnet: string; bridge?: string }): Promise<GuestSegment> {
  const bridge = options.bridge ?? 'vmbr0';
  const switchNs = `${prefix}-sw`;
  const clientNamespace = `${prefix}-c`;
  const clientAddress = `${options.subnet}.2`;
  const created: (() => Promise<void>)[] = [];
  const remove = async (): Promise<void> => {
    for (const undo of created.reverse()) await undo().catch(() => undefined);
  };
  try {
    for (const namespace of [switchNs, clientNamespace]) {
      await removeStaleNamespace(namespace);
      await ip('netns', 'add', namespace);
      created.push(() => ip('netns', 'del', namespace));
      await ip('-n', namespace, 'link', 'set', 'lo', 'up');
    }
    await ip('-n', switchNs, 'link', 'add', 'switch', 'type', 'bridge');
    await ip('-n', switchNs, 'link', 'set', 'switch', 'up');
    for (const [index, host] of hosts.entries()) {
      await ip('-n', host.namespace, 'link', 'add', bridge, 'type', 'bridge');
      created.push(() => ip('-n', host.namespace, 'link', 'del', bridge));
      await ip('-n', host.namespace, 'link', 'add', 'uplink', 'type', 'veth', 'peer', 'name', `port${index}`, 'netns', switchNs);
      created.push(() => ip('-n', host.namespace, 'link', 'del', 'uplink'));
      await ip('-n', host.namespace, 'link', 'set', 'uplink', 'master', bridge);
      await ip('-n', host.namespace, 'link', 'set', 'uplink', 'up');
      await ip('-n', host.namespace, 'link', 'set', bridge, 'up');
      await ip('-n', switchNs, 'link', 'set', `port${index}`, 'master', 'switch');
      await ip('-n', switchNs, 'link', 'set', `port${index}`, 'up');
    }
    await ip('-n', clientNamespace, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'client', 'netns', switchNs);
    await ip('-n', switchNs, 'link', 'set', 'client', 'master', 'switch');
    await ip('-n', switchNs, 'link', 'set', 'client', 'up');
    await ip('-n', clientNamespace, 'addr', 'add', `${clientAddress}/24`, 'dev', 'eth0');
    await ip('-n', clientNamespace, 'link', 'set', 'eth0', 'up');
    return { bridge, clientNamespace, clientAddress, subnet: options.subnet, remove };
  } catch (err) {
    await remove();
    throw err;
  }
}
