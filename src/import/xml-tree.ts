/**
 * A small, ordered element tree from an XML document, read with fast-xml-parser.
 * Each element knows its XPath-like location (`/domain/devices/disk[2]`), so an
 * importer can say exactly which part of a document it did not carry over.
 */
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { VmferryError } from '../errors.ts';

export interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  /** Child elements in document order. */
  children: XmlElement[];
  /** The element's own text, trimmed. */
  text: string;
  /** Where it is: `/domain/devices/disk[2]`; the index appears only when siblings share the name. */
  path: string;
  /** Its place in document order (the root is 0). */
  position: number;
}

// preserveOrder keeps devices in document order: libvirt's order is what a user reads in `virsh dumpxml`.
const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: true,
  ignoreDeclaration: true,
  ignorePiTags: true,
  processEntities: true,
  htmlEntities: false,
});

type OrderedNode = Record<string, unknown>;

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function toElements(nodes: unknown, parentPath: string, counter: { next: number }): XmlElement[] {
  if (!Array.isArray(nodes)) return [];
  const elements: { name: string; node: OrderedNode }[] = [];
  for (const node of nodes as unknown[]) {
    if (!isRecord(node)) continue;
    const name = Object.keys(node).find((key) => key !== ':@' && key !== '#text');
    if (name !== undefined) elements.push({ name, node });
  }
  const counts = new Map<string, number>();
  for (const { name } of elements) counts.set(name, (counts.get(name) ?? 0) + 1);
  const seen = new Map<string, number>();
  return elements.map(({ name, node }) => {
    const index = (seen.get(name) ?? 0) + 1;
    seen.set(name, index);
    const path = `${parentPath}/${name}${(counts.get(name) ?? 0) > 1 ? `[${index}]` : ''}`;
    const attrs: Record<string, string> = {};
    const rawAttrs = node[':@'];
    if (isRecord(rawAttrs)) for (const [key, value] of Object.entries(rawAttrs)) attrs[key] = String(value);
    const position = counter.next++;
    const content = node[name];
    const text = Array.isArray(content)
      ? (content as unknown[])
          .filter((part): part is OrderedNode => isRecord(part) && '#text' in part)
          .map((part) => String(part['#text']))
          .join('')
          .trim()
      : '';
    return { name, attrs, children: toElements(content, path, counter), text, path, position };
  });
}

/**
 * Parses a document and returns its root element, or throws VMF_INVALID_ARGUMENT
 * saying where it is not well-formed. `what` names the input in the message.
 */
export function parseXml(xml: string, what: string): XmlElement {
  if (xml.trim() === '') throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} is empty`);
  const verdict = XMLValidator.validate(xml);
  if (verdict !== true) {
    const { msg, line, col } = verdict.err;
    const where = Number.isInteger(col) ? `line ${line}, column ${col}` : `line ${line}`;
    throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} is not well-formed XML: ${msg} (${where})`);
  }
  const roots = toElements(parser.parse(xml) as unknown, '', { next: 0 });
  const root = roots[0];
  if (root === undefined) throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} has no XML element in it`);
  if (roots.length > 1) throw new VmferryError('VMF_INVALID_ARGUMENT', `${what} is not well-formed XML: it has ${roots.length} top-level elements (<${roots.map((r) => r.name).join('>, <')}>), not one`);
  return root;
}

/** The first child of that name, if any. */
export function child(element: XmlElement, name: string): XmlElement | undefined {
  return element.children.find((c) => c.name === name);
}

/** Every child of that name, in order. */
export function childrenNamed(element: XmlElement, name: string): XmlElement[] {
  return element.children.filter((c) => c.name === name);
}

/** An element as a user would recognise it in the file: `<disk type='file' device='disk'>`. */
export function describe(element: XmlElement): string {
  const attrs = Object.entries(element.attrs).map(([key, value]) => ` ${key}='${value}'`);
  return `<${element.name}${attrs.join('')}>`;
}
