/**
 * Test hosts in their own network namespaces, joined by a bridge: each host
 * has a private address that exists only on links vmferry created itself.
 * Needs root and iproute2.
 */
import { runProgram } from '../util/run.ts';

export interface NamespaceHost {
  name: string;
  namespace: string;
  address: string;
}

export interface NamespaceNetwork {
  /** Address of the bridge: services in the root namespace listen here. */
  gateway: string;
  hosts: NamespaceHost[];
  remove(): Promise<void>;
}

const subnet = '10.213.7';

async function ip(...args: string[]): Promise<void> {
  await runProgram('ip', args, { timeoutMs: 10_000 });
}

export function canUseNamespaces(): boolean {
  return process.getuid?.() === 0;
}

/** Creates one namespace per host name (prefix-a, prefix-b, …), all on one bridge. */
export async function createNamespaceNetwork(prefix: string, hostNames: string[]): Promise<NamespaceNetwork> {
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
      await ip('netns', 'del', namespace).catch(() => undefined);
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
    return { gateway: `${subnet}.1`, hosts, remove };
  } catch (err) {
    await remove();
    throw err;
  }
}
