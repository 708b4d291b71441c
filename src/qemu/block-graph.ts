/**
 * QEMU's block graph as x-debug-query-block-graph gives it: QEMU 7.2's only
 * view of which node, device or block job uses which node that reads
 * nothing through the nodes (query-named-block-nodes does I/O and fails on a
 * fenced client). x-debug: vmferry runs the QEMU it is tested with.
 */
import type { QemuProcess } from './process.ts';

interface GraphNode {
  id: number;
  type: 'block-backend' | 'block-job' | 'block-driver';
  name: string;
}

interface GraphEdge {
  parent: number;
  child: number;
  name: string;
}

export interface BlockGraph {
  /** The block-driver nodes' names. */
  names: Set<string>;
  hasFileChild(nodeName: string): boolean;
  /** What uses the node other than a device or export (a block job, a filter, a format node), in words; [] when nothing. */
  nonRootParents(nodeName: string): string[];
}

export async function readBlockGraph(vm: QemuProcess, signal: AbortSignal): Promise<BlockGraph> {
  const graph = await vm.qmp('reading the block graph', (qmp) =>
    qmp.client.execute<{ nodes: GraphNode[]; edges: GraphEdge[] }>('x-debug-query-block-graph', undefined, { signal }),
  );
  const drivers = graph.nodes.filter((node) => node.type === 'block-driver');
  const idOf = new Map(drivers.map((node) => [node.name, node.id]));
  const byId = new Map(graph.nodes.map((node) => [node.id, node]));
  return {
    names: new Set(idOf.keys()),
    hasFileChild: (nodeName) => graph.edges.some((edge) => edge.parent === idOf.get(nodeName) && edge.name === 'file'),
    nonRootParents: (nodeName) =>
      graph.edges
        .filter((edge) => edge.child === idOf.get(nodeName))
        .flatMap((edge) => {
          const parent = byId.get(edge.parent);
          if (!parent || parent.type === 'block-backend') return [];
          return [`${parent.type === 'block-job' ? 'block job' : 'node'} ${parent.name} (as its ${edge.name})`];
        }),
  };
}
